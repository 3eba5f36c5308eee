"""Turns a PIL image, an image path or a tensor into the normalized ``(3, H, W)`` tensor the vision tower expects.

Every input is either converted to the picture a viewer would show or refused with an error saying what was wrong:
a model fed clipped, all-white or NaN pixels answers confidently about a picture nobody sees. The rules:

- PIL images: 8-bit modes (RGB, L, P, 1, CMYK, ...) convert as PIL does. 16-bit ``I;16*`` images are scaled by
  their full range (65535 -> 255). ``I`` (32-bit) images holding only 0..255 are 8-bit pixels (as integer tensors
  are; ``img.convert("I")`` gives those); otherwise they are read as 16-bit, the range PIL gives 16-bit files, and
  refused outside [0, 65535]. Float ``F`` images must hold values in [0, 1], with the same small overshoot (clamped)
  as float tensors. Transparency (RGBA, LA, PA, or a palette or colour marked transparent) is composited on white,
  as a browser shows a transparent PNG on a page.
- Tensors ``(3, H, W)``: uint8 is 0..255; float must lie in [0, 1] (0..255 floats are refused, not guessed);
  other integer dtypes are 0..255 like uint8 and refused outside it; ``(1, H, W)`` is grayscale, ``(4, H, W)``
  RGBA (composited on white). Bool, complex, NaN or infinite pixels, batches and other shapes are refused.
- Images larger than ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's decompression-bomb guard) and empty images are refused.
- Files and bytes are decoded only in ``IMAGE_FORMATS``: raster formats PIL reads in-process.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

ImageInput = Image.Image | str | Path | torch.Tensor

# The file formats mmgpt decodes (``Image.open(..., formats=IMAGE_FORMATS)``). Without the list PIL tries every
# plugin it has, and some hand the file to another program: EPS and PostScript go to Ghostscript, an interpreter that
# must never run a data set's or a client's file. These are raster formats PIL decodes in-process (a multi-picture
# JPEG, MPO, opens as JPEG); TIFF for 16-bit and float scans, which PNG cannot hold. PPM, ICO and the rest are left
# out: no camera or browser produces them, and each plugin is more untrusted-input parser.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# What PIL's UnidentifiedImageError means then: bytes that are no image, or one in another format (it cannot tell).
UNSUPPORTED_FORMAT = f"not an image in a format mmgpt reads ({', '.join(IMAGE_FORMATS)})"

# The interpolations timm's data configs name, as PIL resampling filters (F.interpolate takes the same names).
_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}

_EXPECTED_TENSOR = "uint8 in 0..255 or float in [0, 1]"
# How far outside [0, 1] a float tensor may stray and still be taken as [0, 1] pixels (clamped): resampling
# overshoot; normalized pixels (about -2..2.6 with ImageNet's statistics) and 0..255 values are well beyond it.
_FLOAT_OVERSHOOT = 0.05


class BadImageError(ValueError):
    """An image mmgpt will not use: unreadable, too large, empty, or with pixels it would misread.

    ``data.on_bad_sample: skip`` drops the samples whose image raises this (a missing file included).
    """


class ImageNotFoundError(BadImageError, FileNotFoundError):
    """An image file that does not exist: a ``FileNotFoundError`` that ``except BadImageError`` also catches."""


def open_image(path: str | Path, owner: str = "") -> Image.Image:
    """Open an image file as an upright RGB image, with the file (and what it belongs to) named in any error.

    Args:
        path: the image file.
        owner: what the image belongs to, e.g. ``"sample coco/3/0"``, added to error messages when given.

    Returns:
        The decoded image in RGB, turned upright by its EXIF orientation and converted by the module's rules
        (16-bit scaled, transparency composited on white).

    Raises:
        ImageNotFoundError: no such file.
        BadImageError: not a regular file (a directory, a FIFO), not a readable image in one of ``IMAGE_FORMATS``,
            larger than ``PIL.Image.MAX_IMAGE_PIXELS``, or holding pixels that the module's rules refuse.
    """
    path = Path(path)
    name = f"{path} ({owner})" if owner else str(path)
    if not path.exists():
        raise ImageNotFoundError(f"image file not found: {name}")
    if not path.is_file():  # opening a FIFO or a device would block on it, or read it forever
        raise BadImageError(f"image {name} is not a regular file")
    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that, and a warning is easily lost in a training log
        # while the decode fills memory: check_size refuses it below, before anything is decoded. (catch_warnings
        # is process-wide: at worst another thread misses that one warning, and check_size refuses its image too.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=IMAGE_FORMATS)
        with image:
            check_size(image, f"image {name}")
            image.load()  # decode now, so a truncated file fails here, inside the try
            return to_rgb(image, f"image {name}")
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses before we can look at the size
        raise BadImageError(
            f"image {name} is too large to decode safely: {e} Raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted"
        ) from e
    except Image.UnidentifiedImageError as e:
        raise BadImageError(f"cannot read image {name}: {UNSUPPORTED_FORMAT}") from e
    # PIL's decoders fail with any of these on a corrupt file.
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise BadImageError(f"cannot read image {name}: {e}") from e


def check_size(image: Image.Image, where: str = "the image") -> None:
    """Refuse an empty image or one above ``PIL.Image.MAX_IMAGE_PIXELS``, from its header alone (no decoding).

    Args:
        image: the image, opened (decoded or not).
        where: how error messages name it, e.g. ``"image a.png (sample coco/3/0)"``.
    """
    w, h = image.size
    if w == 0 or h == 0:
        raise BadImageError(f"{where} is empty ({w}x{h} pixels)")
    limit = Image.MAX_IMAGE_PIXELS  # None switches PIL's guard off, and ours with it
    if limit and w * h > limit:
        raise BadImageError(
            f"{where} is too large to decode safely: {w}x{h} = {w * h:,} pixels, more than "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit:,} (PIL's guard against decompression bombs). "
            f"Raise that limit if the image is trusted"
        )


def to_rgb(image: Image.Image, where: str = "the image") -> Image.Image:
    """A PIL image of any mode as the upright 8-bit RGB picture a viewer shows, or a ``BadImageError``.

    Args:
        image: the image.
        where: how error messages name it, e.g. ``"image a.png (sample coco/3/0)"``.
    """
    check_size(image, where)
    # A phone photo is stored sideways with an EXIF tag saying how to turn it; "the object on the left" must mean
    # the left of the picture as seen. A copy without the tag otherwise, so turning twice is turning once.
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    try:
        if mode == "I" or mode.startswith("I;16"):
            return _gray(_sixteen_bit(image, where))
        if mode == "F":
            return _gray(_unit_float(image, where))
        if image.has_transparency_data:
            # An alpha channel, a palette with alpha or a colour marked transparent: what shows through the
            # transparent parts is the page, white. (PIL's convert("RGB") would show whatever colour the file
            # happens to store under them, often black.) Exact where opaque: alpha 255 keeps the pixel.
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except BadImageError:
        raise
    except ValueError as e:  # "conversion from X to Y not supported"
        raise BadImageError(f"{where}: cannot convert PIL mode {mode!r} to RGB ({e})") from e


def _sixteen_bit(image: Image.Image, where: str) -> np.ndarray:
    values = np.asarray(image)  # (H, W): uint16 for I;16*, int32 for I
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > 65535:
        raise BadImageError(
            f"{where}: a 32-bit integer (PIL mode {image.mode!r}) image with values in [{lo}, {hi}]; "
            f"mmgpt reads integer images as 8-bit (0..255) or 16-bit (0..65535, how PIL opens 16-bit PNG and TIFF "
            f"files). Convert it to 8-bit yourself"
        )
    if image.mode == "I" and hi <= 255:
        # 8-bit pixels widened to 32 bits (Image.fromarray of an int array, img.convert("I")): read as the
        # 0..255 they are, as integer tensors are, not as a near-black 16-bit image.
        return values.astype(np.uint8)
    # The full 16-bit range onto 8 bits: 65535 / 257 = 255 exactly, and v / 257 is never halfway between integers.
    return np.rint(values / 257.0).astype(np.uint8)


def _unit_float(image: Image.Image, where: str) -> np.ndarray:
    values = np.array(image, dtype=np.float32)  # (H, W), a writable copy for torch
    _check_finite(torch.from_numpy(values), where)
    lo, hi = float(values.min()), float(values.max())
    # The same tolerance as float tensors: a resize's overshoot is clamped, 0..255 or normalized values refused.
    if lo < -_FLOAT_OVERSHOOT or hi > 1 + _FLOAT_OVERSHOOT:
        raise BadImageError(
            f"{where}: a float (PIL mode 'F') image with values in [{lo:.6g}, {hi:.6g}]; expected [0, 1] "
            f"(0 black, 1 white). Scale it first, e.g. divide 0..255 values by 255"
        )
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values, "L").convert("RGB")


def _check_finite(x: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        nan = int(torch.isnan(x).sum())
        inf = x.numel() - int(finite.sum()) - nan
        raise BadImageError(
            f"{what} holds {nan} NaN and {inf} infinite values (of {x.numel()}); every pixel must be a finite "
            f"number. mmgpt refuses such images rather than guess what the pixels should be"
        )


def tensor_pixels(image: torch.Tensor) -> torch.Tensor:
    """An image tensor as float RGB in [0, 1], ``(3, H, W)``, by the module's rules; a ``BadImageError`` otherwise.

    Args:
        image: ``(3, H, W)``, ``(1, H, W)`` (grayscale) or ``(4, H, W)`` (RGBA), uint8 (0..255), float in [0, 1],
            or another integer dtype holding 0..255.
    """
    shape = tuple(image.shape)
    if image.dim() == 4:
        raise BadImageError(
            f"an image tensor must be one image (3, H, W), got a batch of shape {shape}: pass a list of "
            f"its {shape[0]} images instead"
        )
    if image.dim() != 3 or image.size(0) not in (1, 3, 4):
        hint = ""
        if image.dim() == 2:
            hint = "; for a grayscale image pass image[None], (1, H, W)"
        elif image.dim() == 3 and image.size(-1) in (1, 3, 4):
            hint = "; channels last? pass image.permute(2, 0, 1)"
        raise BadImageError(
            f"an image tensor must have shape (3, H, W), got {shape} (also accepted: (1, H, W) grayscale, "
            f"(4, H, W) RGBA){hint}"
        )
    if image.size(1) == 0 or image.size(2) == 0:
        raise BadImageError(f"an image tensor of shape {shape} is empty")
    if image.dtype == torch.bool or image.is_complex():
        raise BadImageError(f"an image tensor of dtype {image.dtype} is not an image; expected {_EXPECTED_TENSOR}")
    if image.dtype == torch.uint8:
        x = image.float() / 255.0
    elif image.is_floating_point():
        _check_finite(image, f"an image tensor of shape {shape}")
        lo, hi = float(image.min()), float(image.max())
        if lo < -_FLOAT_OVERSHOOT or hi > 1 + _FLOAT_OVERSHOOT:
            # 0..255 in a float tensor would otherwise be read as almost all white: guessing the scale from the
            # values would be wrong for a dark 0..255 image, so the caller says which it is.
            raise BadImageError(
                f"a float image tensor must hold values in [0, 1], got [{lo:.6g}, {hi:.6g}]: pass 0..255 pixels as "
                f"uint8 or divide them by 255 (and pass the raw image, not one normalized already)"
            )
        # A bicubic resize in the caller's own code overshoots sharp edges a little; PIL's uint8 output clamps it.
        x = image.float().clamp(0.0, 1.0)
    else:
        # Other integers (int64 from torch.tensor(list), int16, ...) hold 0..255 pixels like uint8; anything wider
        # is another bit depth, which only the caller knows.
        lo, hi = int(image.min()), int(image.max())
        if lo < 0 or hi > 255:
            raise BadImageError(
                f"an integer image tensor ({image.dtype}) must hold pixel values 0..255, got [{lo}, {hi}]; for a "
                f"16-bit image pass image / 65535 as float"
            )
        x = image.float() / 255.0
    if x.size(0) == 1:
        x = x.expand(3, -1, -1)  # grayscale: the same value in R, G and B, as PIL's L -> RGB
    elif x.size(0) == 4:
        rgb, alpha = x[:3], x[3:]
        x = rgb * alpha + (1.0 - alpha)  # over white, as transparent PIL images
    return x


@dataclass
class ImageProcessor:
    """Resize to a square and normalize, with the numbers timm's data config gives for the backbone.

    The whole image is resized (no center crop): in captioning and VQA a shape near the border matters as
    much as one in the middle. Photos are turned upright by their EXIF orientation first, as a viewer shows them.
    Which images are accepted, and how odd ones are converted: the module docstring.
    """

    img_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # The backbone's resampling filter (timm's data config: "bicubic" for most models, "bilinear" for some CNNs).
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(
                f"ImageProcessor.interpolation={self.interpolation!r} is not one of {sorted(_PIL_FILTERS)}"
            )

    def __call__(self, image: ImageInput) -> torch.Tensor:
        """Process one image.

        Args:
            image: a PIL image, a path to an image file, or a tensor ``(3, H, W)`` — uint8 or float in [0, 1]
                (the module docstring lists the other shapes and dtypes accepted).

        Returns:
            A float tensor ``(3, img_size, img_size)``, normalized.

        Raises:
            BadImageError: an image that cannot be read or would be misread; the message says what was wrong.
        """
        if isinstance(image, (str, Path)):
            image = open_image(image)
        if isinstance(image, Image.Image):
            image = to_rgb(image)
            if image.size != (self.img_size, self.img_size):
                image = image.resize((self.img_size, self.img_size), _PIL_FILTERS[self.interpolation])
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            x = x.view(self.img_size, self.img_size, 3).permute(2, 0, 1).float() / 255.0  # (3, H, W)
        elif isinstance(image, torch.Tensor):
            x = tensor_pixels(image)  # (3, H, W) in [0, 1]
            if x.shape[-2:] != (self.img_size, self.img_size):
                mode = self.interpolation
                # Antialiasing as PIL does when shrinking (nearest has none); clamping as PIL's uint8 output does,
                # since bicubic overshoots at sharp edges.
                x = F.interpolate(
                    x[None], size=(self.img_size, self.img_size), mode=mode, antialias=mode != "nearest"
                )[0].clamp(0.0, 1.0)
        else:
            raise TypeError(f"expected a PIL image, a path or a (3, H, W) tensor, got {type(image).__name__}")
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
