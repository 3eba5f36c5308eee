"""Pictures of any size as LLaVA-OneVision takes them: tiles on a canvas chosen per picture, and the tiles' tokens
packed back into one picture-shaped sequence of a length that depends on the picture's size.

The vision tower sees squares of ``tile_size`` pixels and turns each into ``g x g`` tokens (``g = tile_size /
patch_size``). A picture of ``H x W`` pixels becomes (``AnyresImageProcessor``, the ``pixel_values`` of
transformers' ``LlavaOnevisionImageProcessor``):

1. a base view: the whole picture squashed to one tile;
2. ``rows x cols`` tiles: the canvas from ``grid_pinpoints`` that shows most of the picture's pixels and wastes the
   least (``select_best_resolution``); the picture is resized into it keeping its aspect ratio, centred on black
   padding, and cut row by row.

Each of the ``1 + rows * cols`` tiles goes through the tower and the projector on its own. ``AnyresPacker`` then
packs them into the picture's sequence, as HF's ``LlavaOnevisionModel.pack_image_features``:

3. the tiles' tokens are laid out as one ``rows*g x cols*g`` feature map;
4. the rows (or columns) that saw only padding are cropped (unpadding, to the picture's aspect ratio);
5. a map of more than ``max_tiles`` tiles' worth of tokens is shrunk by bilinear interpolation to about that many
   (when the side ratio ``sqrt(tokens / (max_tiles * g * g))`` exceeds 1.1; ``vision_aspect_ratio="anyres_max_9"``
   is ``max_tiles=9``);
6. a learned ``image_newline`` embedding is appended after every row, and the base view's ``g*g`` tokens go first.

The length is known from the picture's size alone (``AnyresLayout.num_tokens``): the prompt holds exactly that many
``<image>`` placeholders, as ``LlavaOnevisionProcessor`` writes them. In a prompt with several pictures each one is
not split: it is padded to a square with the mean colour and squashed to one tile, ``g*g`` tokens and one newline.

Pictures are read by ``mmgpt.models.image_processor``'s rules (see ``mmgpt.models.image_tiling`` for the two cases
where that differs from what transformers reads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgpt.models.image_processor import ImageInput
from mmgpt.models.image_tiling import RESAMPLE_NAMES, TilingImageProcessor, crop, rgb8
from mmgpt.prompts import IMAGE

# A packed map is shrunk only when its side is over 1.1x that of max_tiles tiles' worth of tokens (HF's threshold).
POOL_SLACK = 1.1
# transformers' defaults for a LlavaOnevisionImageProcessor config that leaves a field out (OpenAI CLIP's).
HF_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
HF_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
HF_PROCESSOR_TYPES = ("LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorPil")


# ---------------------------------------------------------------------------------------------------------
# Geometry: which canvas, which tokens survive, how many there are


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The ``(height, width)`` canvas of ``pinpoints`` that shows most of a ``height x width`` picture's pixels
    (it is never enlarged in this count), the least wasted area breaking ties; the first such one in order.

    The float expressions are transformers' ``select_best_resolution``, so ties resolve alike.
    """
    best, best_effective, best_waste = None, 0, float("inf")
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        shown_w, shown_h = int(width * scale), int(height * scale)
        effective = min(shown_w * shown_h, width * height)
        waste = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (canvas_h, canvas_w), effective, waste
    if best is None:
        raise ValueError(f"no canvas in grid_pinpoints={list(pinpoints)} fits a {height}x{width} picture")
    return best


def fit_into(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """The size of a ``height x width`` picture resized into ``canvas`` keeping its aspect ratio: one side fills
    the canvas, the other is rounded up (transformers' ``get_patch_output_size``)."""
    canvas_h, canvas_w = canvas
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def unpad_margins(height: int, width: int, map_h: int, map_w: int) -> tuple[int, int]:
    """``(rows, cols)`` to crop at *each* end of a ``map_h x map_w`` feature map so that it keeps the aspect ratio of
    a ``height x width`` picture: the tokens that saw only the canvas's padding (HF's ``unpad_image``).

    The map is that of the whole canvas, the picture centred in it; the margins are equal, so where the padding
    spans an odd number of tokens one of them is kept (as in HF).
    """
    if width / height > map_w / map_h:  # wider than the map: the padding is above and below
        shown = int(round(height * (map_w / width), 7))
        return (map_h - shown) // 2, 0
    shown = int(round(width * (map_h / height), 7))
    return 0, (map_w - shown) // 2


@dataclass(frozen=True)
class AnyresLayout:
    """Where a picture's tokens come from: everything the packer and the prompt need besides the weights."""

    tile_size: int  # pixels on a side of a tile, the vision tower's input
    patch_grid: int  # g: tokens on a side of a tile after the projector
    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) canvases, multiples of tile_size
    max_tiles: int = 9  # "anyres_max_9": a packed map above 9 tiles' worth of tokens is shrunk

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid_pinpoints", tuple((int(h), int(w)) for h, w in self.grid_pinpoints))
        problems = check_pinpoints(self.grid_pinpoints, self.tile_size)
        if self.patch_grid < 1 or self.max_tiles < 1:
            problems.append(f"patch_grid={self.patch_grid} and max_tiles={self.max_tiles} must be positive")
        if problems:
            raise ValueError("; ".join(problems))

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, cols)`` of tiles a ``height x width`` picture is cut into (besides its base view)."""
        canvas_h, canvas_w = select_best_resolution(height, width, self.grid_pinpoints)
        return canvas_h // self.tile_size, canvas_w // self.tile_size

    def packed_grid(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int] | None]:
        """For a split picture: ``(margins, unpadded, pooled)``: the rows and columns cropped at each end of the
        tiles' feature map, the ``(h, w)`` left after that, and the ``(h, w)`` it is shrunk to (``None``: kept)."""
        rows, cols = self.tile_grid(height, width)
        g = self.patch_grid
        map_h, map_w = rows * g, cols * g
        top, left = unpad_margins(height, width, map_h, map_w)
        h, w = map_h - 2 * top, map_w - 2 * left
        ratio = math.sqrt(h * w / (self.max_tiles * g**2))
        pooled = (int(h // ratio), int(w // ratio)) if ratio > POOL_SLACK else None
        return (top, left), (h, w), pooled

    def num_tokens(self, height: int, width: int, split: bool = True) -> int:
        """The ``<image>`` placeholders a ``height x width`` picture takes in a prompt (``split=False``: one of
        several pictures in a prompt): ``LlavaOnevisionProcessor``'s count, and the packer's output length."""
        g = self.patch_grid
        if not split:
            return g * g + 1  # the tile and one newline
        _, (h, w), pooled = self.packed_grid(height, width)
        h, w = pooled or (h, w)
        return g * g + h * (w + 1)  # the base view, then each row and its newline


def check_pinpoints(pinpoints: Sequence[Sequence[int]], tile_size: int) -> list[str]:
    """What is wrong with ``grid_pinpoints`` for tiles of ``tile_size``: each a ``(height, width)`` pair of positive
    multiples of the tile (HF cuts a canvas into whole tiles; a partial one would be stretched)."""
    if not pinpoints:
        return ["grid_pinpoints is empty (expected (height, width) canvases, multiples of the tile size)"]
    bad = [p for p in pinpoints if len(p) != 2 or any(int(x) < tile_size or int(x) % tile_size for x in p)]
    if bad:
        bad = [list(p) for p in bad][:5]
        return [f"grid_pinpoints {bad} are not (height, width) multiples of the {tile_size} px tile"]
    return []


def repeat_image_markers(text: str, counts: Sequence[int]) -> str:
    """``text`` with its ``<image>`` markers, in order, each repeated to its picture's ``count`` (``num_tokens``),
    as ``LlavaOnevisionProcessor`` expands them.

    Raises:
        ValueError: the text holds another number of markers than there are counts.
    """
    parts = text.split(IMAGE)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"the text holds {len(parts) - 1} {IMAGE} markers for {len(counts)} pictures")
    out = parts[0]
    for count, part in zip(counts, parts[1:], strict=True):
        out += IMAGE * count + part
    return out


# ---------------------------------------------------------------------------------------------------------
# Packing


class AnyresPacker(nn.Module):
    """Packs the projected tokens of a picture's tiles into its token sequence (steps 3-6 of the module docstring).

    Its one weight is ``image_newline`` ``(n_embd,)``, the embedding appended after every row.
    """

    def __init__(self, n_embd: int, layout: AnyresLayout) -> None:
        super().__init__()
        self.layout = layout
        # HF's init (std 1/sqrt(n_embd), the scale of word embeddings); an imported model overwrites it.
        self.image_newline = nn.Parameter(torch.randn(n_embd) / math.sqrt(n_embd))

    def forward(self, tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Pack one picture.

        Args:
            tiles: ``(1 + rows * cols, g * g, n_embd)``: the base view's tokens, then each tile's, row by row; or
                ``(1, g * g, n_embd)`` for a picture that was not split.
            size: ``(height, width)`` of the picture as read, before any resize.

        Returns:
            ``(layout.num_tokens(height, width, split), n_embd)``.
        """
        K, N, C = tiles.shape
        g = self.layout.patch_grid
        if N != g * g:
            raise ValueError(f"expected {g}x{g} = {g * g} tokens per tile, got {N}")
        newline = self.image_newline.to(tiles.dtype)
        if K == 1:  # one of several pictures in a prompt: not split
            return torch.cat([tiles[0], newline[None]])  # (g*g + 1, C)
        height, width = (int(s) for s in size)
        rows, cols = self.layout.tile_grid(height, width)
        if K != 1 + rows * cols:
            raise ValueError(
                f"a {height}x{width} picture is cut into 1 + {rows}x{cols} tiles, but {K} were given; make them "
                f"with the model's processor"
            )
        base, grid = tiles[0], tiles[1:]
        x = grid.view(rows, cols, g, g, C).permute(4, 0, 2, 1, 3).reshape(C, rows * g, cols * g)  # one map
        (top, left), (h, w), pooled = self.layout.packed_grid(height, width)
        x = x[:, top : top + h, left : left + w]  # (C, h, w): the padding's rows or columns cropped
        if pooled is not None:
            # HF's bilinear resize (no antialias, align_corners=False): the same call gives the same numbers.
            x = F.interpolate(x[None], size=list(pooled), mode="bilinear")[0]  # (C, h', w')
        x = torch.cat([x, newline[:, None, None].expand(C, x.size(1), 1)], dim=2)  # (C, h, w + 1)
        return torch.cat([base, x.flatten(1).transpose(0, 1)])  # (g*g + h * (w + 1), C)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing


# Not frozen, and compared by identity (== on its tensor would be elementwise): Lightning's precision plugins cast a
# batch's tensors by setting the fields of the dataclasses that hold them.
@dataclass(eq=False)
class AnyresImage:
    """One picture as the vision tower takes it."""

    # (1 + rows * cols, 3, S, S): the base view, then the tiles row by row; (1, 3, S, S) when not split.
    pixels: torch.Tensor
    size: tuple[int, int]  # (height, width) of the picture as read: the packer unpads to it
    grid: tuple[int, int]  # (rows, cols) of tiles; (0, 0) when not split

    @property
    def split(self) -> bool:
        return self.pixels.size(0) > 1

    def to(self, *args, **kwargs) -> AnyresImage:
        """The picture with its pixels moved or cast (``Tensor.to``'s arguments), as a batch's tensors are: Lightning
        moves every value of a batch that has a ``to``."""
        return replace(self, pixels=self.pixels.to(*args, **kwargs))


@dataclass
class AnyresImageProcessor:
    """Pictures -> ``AnyresImage``: the ``pixel_values`` of transformers' ``LlavaOnevisionImageProcessor``.

    Resizing, rescaling and normalizing are ``image_tiling.TilingImageProcessor``'s (the same transformers backends,
    chosen by ``backend``); ``AnyresImageProcessor.from_hf(d)`` reads the processor's saved config.
    """

    # Side of a tile, the vision tower's input (size["height"]: 384 for the released models).
    tile_size: int
    # (height, width) canvases a picture may be laid out on, multiples of tile_size.
    grid_pinpoints: list[list[int]]
    mean: tuple[float, float, float] = HF_DEFAULT_MEAN
    std: tuple[float, float, float] = HF_DEFAULT_STD
    rescale_factor: float = 1 / 255
    # One of image_tiling.RESAMPLE_NAMES' values; the released models use bicubic.
    resample: str = "bicubic"
    # Whose resize to equal: "torchvision" (transformers 5's default) or "pil"; None: transformers' default here.
    backend: str | None = None
    # How the model packs a picture's tiles (set by ``MMGPT``, not saved with the config): with it the processor
    # also counts a picture's <image> placeholders (``num_tokens``), as LlavaOnevisionProcessor does, for whoever
    # holds only the processor (a training collator).
    layout: AnyresLayout | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self.grid_pinpoints = [[int(h), int(w)] for h, w in self.grid_pinpoints]
        problems = check_pinpoints(self.grid_pinpoints, self.tile_size)
        if problems:
            raise ValueError("; ".join(problems))
        # The resize and normalization of the Idefics3 processor, which run the same transformers code; its tiling
        # fields are not used.
        self._ops = TilingImageProcessor(
            tile_size=self.tile_size, longest_edge=self.tile_size, mean=self.mean, std=self.std,
            rescale_factor=self.rescale_factor, resample=self.resample, backend=self.backend,
        )
        self.backend = self._ops.backend

    @property
    def img_size(self) -> int:
        """The side of every image the vision tower gets."""
        return self.tile_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str = "image processor", backend: str | None = None):
        """Build from a saved ``LlavaOnevisionImageProcessor`` config (its JSON as a dict).

        Missing mean, std, rescale factor and filter take the HF class's defaults. Raises ``ValueError`` naming
        every field mmgpt does not reproduce.
        """
        problems = []
        kind = d.get("image_processor_type", HF_PROCESSOR_TYPES[0])
        if kind not in HF_PROCESSOR_TYPES:
            problems.append(f"image_processor_type={kind!r} (expected one of {list(HF_PROCESSOR_TYPES)})")
        for flag in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize"):
            if d.get(flag, True) is not True:
                problems.append(f"{flag}={d[flag]!r} (expected true)")
        if d.get("do_center_crop"):
            problems.append(f"do_center_crop={d['do_center_crop']!r} (expected false: tiles are not cropped)")
        size, tile = d.get("size"), None
        if isinstance(size, dict) and "height" in size and size.get("height") == size.get("width"):
            tile = size["height"]
        elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
            tile = size["shortest_edge"]
        if not isinstance(tile, int) or tile < 1:
            problems.append(f"size={size!r} (expected a square tile, {{'height': S, 'width': S}})")
        pinpoints = d.get("image_grid_pinpoints")
        if not isinstance(pinpoints, list) or not all(isinstance(p, (list, tuple)) for p in pinpoints):
            problems.append(f"image_grid_pinpoints={pinpoints!r} (expected a list of [height, width])")
        elif isinstance(tile, int) and tile >= 1:
            problems += check_pinpoints(pinpoints, tile)
        resample = d.get("resample", 3)
        if resample not in RESAMPLE_NAMES:
            problems.append(f"resample={resample!r} (expected one of PIL's filters {sorted(RESAMPLE_NAMES)})")
        if problems:
            raise ValueError(f"{where} does not fit mmgpt's anyres processor: " + "; ".join(problems))

        def three(x: Any) -> tuple[float, float, float]:
            return tuple(float(v) for v in (x if isinstance(x, (list, tuple)) else [x] * 3))

        return cls(
            tile_size=tile, grid_pinpoints=pinpoints, mean=three(d.get("image_mean", HF_DEFAULT_MEAN)),
            std=three(d.get("image_std", HF_DEFAULT_STD)), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            resample=RESAMPLE_NAMES[resample], backend=backend,
        )

    def to_dict(self) -> dict[str, Any]:
        """The processor's settings (not its ``layout``, which belongs to the model)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layout"}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def num_tokens(self, image: AnyresImage) -> int:
        """The ``<image>`` placeholders ``image`` (this processor's output) takes in a prompt: the length of its
        packed tokens, ``LlavaOnevisionProcessor``'s count.

        Raises:
            ValueError: the processor has no ``layout`` (only a model's processor, ``model.processor``, has one).
        """
        if self.layout is None:
            raise ValueError(
                "this AnyresImageProcessor has no layout, so it cannot count a picture's tokens: use the model's "
                "processor (model.processor), which knows how its packer lays the tiles out"
            )
        return self.layout.num_tokens(*image.size, split=image.split)

    def __call__(self, image: ImageInput, split: bool = True) -> AnyresImage:
        """Process one picture.

        Args:
            image: a PIL image, a path, or a ``(3, H, W)`` tensor (as ``image_tiling.TilingImageProcessor``).
            split: lay it out on a canvas of tiles (a prompt's only picture); ``False`` for each of several
                pictures in one prompt, which HF pads to a square with the mean colour and takes as one tile.

        Returns:
            Its base view and tiles, normalized, its size and its grid.
        """
        pixels = rgb8(image)  # (H, W, 3) uint8
        H, W = pixels.shape[:2]
        ops, backend, S = self._ops, self.backend, self.tile_size
        resize = ops.resize
        x = torch.from_numpy(pixels).permute(2, 0, 1).contiguous() if backend == "torchvision" else pixels
        if not split:
            # Padded with the mean colour in 8 bits, truncated as HF's int(m * 255).
            fill = tuple(int(m * 255) for m in self.mean)
            return AnyresImage(ops.normalize([resize(_pad(x, *_square_margins(H, W), fill, backend), (S, S))]),
                               (H, W), (0, 0))
        canvas = select_best_resolution(H, W, self.grid_pinpoints)
        h, w = fit_into(H, W, canvas)
        resized = resize(x, (h, w))
        # Centred on black, an odd pixel of padding at the far end (HF pads the uint8 picture with zeros).
        top, left = (canvas[0] - h) // 2, (canvas[1] - w) // 2
        canvas_pixels = _pad(resized, top, left, canvas[0] - h - top, canvas[1] - w - left, 0, backend)
        rows, cols = canvas[0] // S, canvas[1] // S
        frames = [resize(x, (S, S))]  # the base view first
        frames += [crop(canvas_pixels, i * S, j * S, S, backend) for i in range(rows) for j in range(cols)]
        return AnyresImage(ops.normalize(frames), (H, W), (rows, cols))


def _square_margins(height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` padding that centres a picture in the square of its longer side."""
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return top, left, side - height - top, side - width - left


def _pad(x, top: int, left: int, bottom: int, right: int, fill, backend: str):
    """Pad an 8-bit picture, ``(3, H, W)`` tensor (torchvision) or ``(H, W, 3)`` array (PIL), with ``fill``."""
    if backend == "torchvision":
        from torchvision.transforms.v2 import functional as tvF

        return tvF.pad(x, padding=[left, top, right, bottom], fill=fill)
    out = np.empty((x.shape[0] + top + bottom, x.shape[1] + left + right, 3), dtype=x.dtype)
    out[...] = np.asarray(fill, dtype=x.dtype)
    out[top : top + x.shape[0], left : left + x.shape[1]] = x
    return out


__all__ = [
    "AnyresImage", "AnyresImageProcessor", "AnyresLayout", "AnyresPacker", "select_best_resolution", "fit_into",
    "unpad_margins", "check_pinpoints", "repeat_image_markers",
]
