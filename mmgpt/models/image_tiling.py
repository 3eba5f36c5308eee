"""Image splitting as Idefics3 and SmolVLM do it: one picture becomes row-major tiles plus a global view.

The vision tower sees squares of ``tile_size`` pixels (its own ``img_size``); a larger picture is cut into as many
as it needs, and every tile yields the same ``image_seq_len`` tokens. In mmgpt's terms one user image is
``rows * cols + 1`` images, spliced in order into ``rows * cols + 1`` runs of ``<image>`` placeholders, so
``MMGPT`` itself needs nothing new. What is specific is here:

- ``TilingImageProcessor``: a picture -> ``TiledImage`` (the tiles and the global view, ``(K + 1, 3, S, S)``, and
  the ``(rows, cols)`` grid), the ``pixel_values`` of transformers' ``Idefics3ImageProcessor`` (=
  ``SmolVLMImageProcessor``) exactly. Its steps, all on 8-bit pixels:

  1. resize so the longest edge is ``longest_edge`` (``size["longest_edge"]``; small pictures are enlarged too),
     the other edge ``int(longest_edge / aspect)`` rounded up to even, no side above 4096;
  2. resize each side up to a multiple of ``tile_size`` (``max_image_size["longest_edge"]``): the long side
     first, the short one from it through the aspect ratio;
  3. if that is larger than one tile: cut it into ``rows x cols`` tiles, row by row, and add the picture
     resized to one tile (the global view) last; otherwise the picture is the one tile (``rows = cols = 0``).
     Without splitting (``do_image_splitting=False``) step 2 and 3 are one resize to a single square tile;
  4. rescale by ``rescale_factor`` and normalize with ``mean``/``std``.

  Every resize uses ``resample`` (Lanczos for both models). transformers has two implementations that differ by
  up to 2 levels in about 1% of pixels: torchvision's (its default where torchvision >= 0.27 runs Lanczos, as
  here) and PIL's (``backend="pil"``, older environments, and the transformers 4 processor the models were
  trained with). ``backend`` picks which one to equal; the default follows transformers' own choice.

- ``image_prompt`` / ``expand_image_markers``: the text the HF processor writes in place of each ``<image>``:
  per tile ``<fake_token_around_image><row_i_col_j>`` and ``image_seq_len`` ``<image>`` tokens, a newline after
  each row, then ``\\n<fake_token_around_image><global-img>``, the global view's tokens and a closing
  ``<fake_token_around_image>``; an unsplit image is the last part alone, without the newline.

Pictures are read by ``mmgpt.models.image_processor``'s rules (EXIF orientation applied, transparency over
white): for 8-bit pictures that is what transformers reads too, except a photo with an EXIF rotation (transformers
does not turn it) and a palette image whose palette carries alpha (transformers drops the alpha, showing the
colours stored under transparent pixels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmgpt.models.image_processor import BadImageError, ImageInput, open_image, tensor_pixels, to_rgb
from mmgpt.prompts import IMAGE

FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
# The processors' absolute cap on a side after step 1 (4K).
MAX_IMAGE_SIZE = 4096
# HF saves the filter as PIL's number.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
BACKENDS = ("torchvision", "pil")


@dataclass(frozen=True)
class TiledImage:
    """One picture as the vision tower takes it."""

    # (rows * cols + 1, 3, S, S): the tiles row by row, then the global view; (1, 3, S, S) when not split.
    pixels: torch.Tensor
    rows: int  # 0 when the picture was not split
    cols: int

    @property
    def num_images(self) -> int:
        """How many vision-tower images (and runs of ``image_seq_len`` placeholders) the picture takes."""
        return self.pixels.size(0)


def row_col_token(row: int, col: int) -> str:
    """The marker of the tile in ``row``, ``col`` (0-based): ``<row_1_col_1>`` for the top-left one."""
    return f"<row_{row + 1}_col_{col + 1}>"


def image_prompt(rows: int, cols: int, image_seq_len: int) -> str:
    """The text that stands for one picture split into ``rows x cols`` tiles (0 x 0: not split), as the HF
    Idefics3/SmolVLM processors write it in place of its ``<image>``.

    Args:
        rows, cols: the picture's grid (``TiledImage.rows``, ``.cols``).
        image_seq_len: ``<image>`` tokens per tile (``MMGPT.image_seq_len``).
    """
    tile = IMAGE * image_seq_len
    global_view = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{tile}{FAKE_TOKEN}"
    if rows == 0 and cols == 0:
        return global_view
    text = ""
    for i in range(rows):
        text += "".join(f"{FAKE_TOKEN}{row_col_token(i, j)}{tile}" for j in range(cols)) + "\n"
    return text + "\n" + global_view


def expand_image_markers(text: str, grids: list[tuple[int, int]], image_seq_len: int) -> str:
    """``text`` with its ``<image>`` markers, in order, replaced by ``image_prompt`` of each picture's grid.

    Args:
        text: a rendered prompt holding one ``<image>`` per picture.
        grids: ``(rows, cols)`` per picture, in the order of the markers.
        image_seq_len: ``<image>`` tokens per tile.

    Raises:
        ValueError: the text holds another number of markers than there are grids.
    """
    parts = text.split(IMAGE)
    if len(parts) - 1 != len(grids):
        raise ValueError(f"the text holds {len(parts) - 1} {IMAGE} markers for {len(grids)} pictures")
    out = parts[0]
    for (rows, cols), part in zip(grids, parts[1:], strict=True):
        out += image_prompt(rows, cols, image_seq_len) + part
    return out


def fit_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Step 1's size: the longest edge to ``longest_edge``, the other through the aspect ratio, made even."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # Then below the 4K cap, without the even rounding (transformers' two helpers, applied in turn).
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def fit_tiles(height: int, width: int, tile_size: int) -> tuple[int, int]:
    """Step 2's size: each side up to a multiple of ``tile_size``, the short side derived from the long one."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile_size) * tile_size
        height = math.ceil(int(width / aspect) / tile_size) * tile_size
    else:
        height = math.ceil(height / tile_size) * tile_size
        width = math.ceil(int(height * aspect) / tile_size) * tile_size
    return height, width


def _torchvision_has_lanczos() -> bool:
    try:
        major, minor = (int(x) for x in version("torchvision").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (0, 27)


@dataclass
class TilingImageProcessor:
    """Pictures -> ``TiledImage``: the ``pixel_values`` of transformers' Idefics3/SmolVLM image processor.

    The steps are the module docstring's. ``TilingImageProcessor.from_hf(d)`` reads the processor's saved config.
    """

    # Side of a tile, the vision tower's input (max_image_size["longest_edge"]: 512 for SmolVLM-256M).
    tile_size: int
    # The longest edge after step 1 (size["longest_edge"]: 4 tiles, 2048, for SmolVLM-256M).
    longest_edge: int
    do_resize: bool = True
    do_image_splitting: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    # One of RESAMPLE_NAMES' values; both models use Lanczos.
    resample: str = "lanczos"
    # Whose resize to equal: "torchvision" or "pil" (see the module docstring). None: transformers' default here,
    # torchvision where it runs Lanczos (>= 0.27), else PIL.
    backend: str | None = None

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.resample not in RESAMPLE_NAMES.values():
            raise ValueError(f"resample={self.resample!r} is not one of {sorted(RESAMPLE_NAMES.values())}")
        if self.backend is None:
            self.backend = "torchvision" if _torchvision_has_lanczos() else "pil"
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {list(BACKENDS)}")
        if self.backend == "torchvision" and self.resample == "lanczos" and not _torchvision_has_lanczos():
            # transformers would fall back to bicubic there, a different picture: refuse rather than guess.
            raise ValueError("backend='torchvision' resizes with Lanczos from torchvision 0.27 on; use backend='pil'")
        if self.tile_size < 1 or self.longest_edge < 1:
            raise ValueError(f"tile_size={self.tile_size} and longest_edge={self.longest_edge} must be positive")

    @property
    def img_size(self) -> int:
        """The side of every image the vision tower gets."""
        return self.tile_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str = "image processor", backend: str | None = None):
        """Build from a saved ``Idefics3ImageProcessor``/``SmolVLMImageProcessor`` config (its JSON as a dict).

        Missing fields take the HF class's defaults. Raises ``ValueError`` naming every field mmgpt does not
        reproduce (switching off RGB conversion, rescaling or normalization; a fixed ``size``).
        """
        problems = []
        for flag in ("do_convert_rgb", "do_rescale", "do_normalize"):
            if d.get(flag, True) is not True:
                problems.append(f"{flag}={d[flag]!r} (expected true)")
        size, tile = d.get("size", {"longest_edge": 4 * 364}), d.get("max_image_size", {"longest_edge": 364})
        if not isinstance(size, dict) or "longest_edge" not in size:
            problems.append(f"size={size!r} (expected {{'longest_edge': ...}})")
        if not isinstance(tile, dict) or "longest_edge" not in tile:
            problems.append(f"max_image_size={tile!r} (expected {{'longest_edge': ...}})")
        resample = d.get("resample", 1)
        if resample not in RESAMPLE_NAMES:
            problems.append(f"resample={resample!r} (expected one of PIL's filters {sorted(RESAMPLE_NAMES)})")
        if problems:
            raise ValueError(f"{where} does not fit mmgpt's tiling processor: " + "; ".join(problems))

        def three(x: Any) -> tuple[float, float, float]:
            return tuple(float(v) for v in (x if isinstance(x, (list, tuple)) else [x] * 3))

        return cls(
            tile_size=int(tile["longest_edge"]), longest_edge=int(size["longest_edge"]),
            do_resize=bool(d.get("do_resize", True)), do_image_splitting=bool(d.get("do_image_splitting", True)),
            mean=three(d.get("image_mean", 0.5)), std=three(d.get("image_std", 0.5)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)), resample=RESAMPLE_NAMES[resample],
            backend=backend,
        )

    def to_hf(self) -> dict[str, Any]:
        """The fields of an HF ``Idefics3ImageProcessor`` config that reproduce this processor."""
        pil_number = {name: number for number, name in RESAMPLE_NAMES.items()}
        return {
            "do_convert_rgb": True, "do_resize": self.do_resize, "do_rescale": True, "do_normalize": True,
            "do_pad": True, "do_image_splitting": self.do_image_splitting,
            "size": {"longest_edge": self.longest_edge}, "max_image_size": {"longest_edge": self.tile_size},
            "image_mean": list(self.mean), "image_std": list(self.std), "rescale_factor": self.rescale_factor,
            "resample": pil_number[self.resample], "image_processor_type": "Idefics3ImageProcessor",
        }

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, cols)`` for a picture of ``height x width`` pixels, without processing it (0, 0: not split)."""
        if not self.do_image_splitting:
            return 0, 0
        if self.do_resize:
            height, width = fit_longest_edge(height, width, self.longest_edge)
        height, width = fit_tiles(height, width, self.tile_size)
        S = self.tile_size
        return (height // S, width // S) if height > S or width > S else (0, 0)

    def __call__(self, image: ImageInput) -> TiledImage:
        """Process one picture.

        Args:
            image: a PIL image, a path, or a ``(3, H, W)`` tensor (uint8, or float in [0, 1], which is rounded
                to 8 bits first; ``mmgpt.models.image_processor`` lists the other shapes accepted).

        Returns:
            Its tiles and global view, normalized, and its grid.

        Raises:
            BadImageError: an image that cannot be read or would be misread.
        """
        pixels = rgb8(image)  # (H, W, 3) uint8
        resize = self.resize
        x = torch.from_numpy(pixels).permute(2, 0, 1).contiguous() if self.backend == "torchvision" else pixels
        H, W = pixels.shape[:2]
        S = self.tile_size
        if self.do_resize:
            x = resize(x, fit_longest_edge(H, W, self.longest_edge))
            H, W = _size(x, self.backend)
        rows = cols = 0
        if not self.do_image_splitting:
            frames = [resize(x, (S, S))]
        else:
            h, w = fit_tiles(H, W, S)
            if h == 0 or w == 0:
                raise BadImageError(f"a {H}x{W} picture is too elongated to cut into {S} px tiles")
            x = resize(x, (h, w))
            if h > S or w > S:
                rows, cols = h // S, w // S
                frames = [crop(x, i * S, j * S, S, self.backend) for i in range(rows) for j in range(cols)]
                frames.append(resize(x, (S, S)))  # the global view
            else:
                frames = [x]
        return TiledImage(self.normalize(frames), rows, cols)

    def resize(self, x, size: tuple[int, int]):
        """Resize an 8-bit picture to ``size`` ``(height, width)`` with ``resample``, as transformers' backend
        ``self.backend`` does: a ``(3, H, W)`` uint8 tensor for torchvision, an ``(H, W, 3)`` uint8 array for PIL."""
        return self._resize_torchvision(x, size) if self.backend == "torchvision" else self._resize_pil(x, size)

    def _resize_torchvision(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as tvF

        # transformers maps PIL's NEAREST to torchvision's NEAREST_EXACT (the same pixel centres as PIL).
        name = "NEAREST_EXACT" if self.resample == "nearest" else self.resample.upper()
        return tvF.resize(x, list(size), interpolation=tvF.InterpolationMode[name], antialias=True)

    def _resize_pil(self, x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        h, w = size
        return np.asarray(Image.fromarray(x).resize((w, h), Image.Resampling[self.resample.upper()]))

    def normalize(self, frames: list) -> torch.Tensor:
        """8-bit frames of one size (``resize``'s outputs) -> ``(K, 3, S, S)`` float32, rescaled and normalized with
        the roundings of transformers' backend ``self.backend``."""
        if self.backend == "torchvision":
            from torchvision.transforms.v2 import functional as tvF

            # transformers folds the rescale into the statistics and normalizes the 0..255 values in float32:
            # the same expressions give the same roundings.
            mean = torch.tensor(self.mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.std) * (1.0 / self.rescale_factor)
            return tvF.normalize(torch.stack(frames).to(torch.float32), mean, std)  # (K+1, 3, S, S)
        # PIL: rescaled in float64, stored as float32, then normalized in float32 (numpy's rounding, as HF's).
        x = (np.stack(frames).astype(np.float64) * self.rescale_factor).astype(np.float32)  # (K+1, S, S, 3)
        x = (x - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def rgb8(image: ImageInput) -> np.ndarray:
    """A picture as 8-bit RGB ``(H, W, 3)``, read by ``mmgpt.models.image_processor``'s rules."""
    if isinstance(image, (str, Path)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        return np.array(to_rgb(image))  # a writable copy, for torch.from_numpy
    if isinstance(image, torch.Tensor):
        # uint8 comes back exactly (k / 255 * 255 rounds to k); float pixels are stored as 8 bits, as PIL would.
        x = (tensor_pixels(image) * 255.0).round().to(torch.uint8)  # (3, H, W)
        return x.permute(1, 2, 0).contiguous().numpy()
    raise TypeError(f"expected a PIL image, a path or a (3, H, W) tensor, got {type(image).__name__}")


def _size(x, backend: str) -> tuple[int, int]:
    return tuple(x.shape[-2:]) if backend == "torchvision" else tuple(x.shape[:2])


def crop(x, top: int, left: int, size: int, backend: str):
    """The ``size`` square at ``(top, left)`` of a ``(3, H, W)`` tensor (torchvision) or ``(H, W, 3)`` array (PIL)."""
    if backend == "torchvision":
        return x[:, top : top + size, left : left + size]  # (3, S, S)
    return x[top : top + size, left : left + size]  # (S, S, 3)


__all__ = [
    "TilingImageProcessor", "TiledImage", "image_prompt", "expand_image_markers", "row_col_token",
    "fit_longest_edge", "fit_tiles", "rgb8", "crop", "FAKE_TOKEN", "GLOBAL_TOKEN",
]
