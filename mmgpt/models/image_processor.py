"""Turns a PIL image, an image path or a tensor into the normalized ``(3, H, W)`` tensor the vision tower expects."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

ImageInput = Image.Image | str | Path | torch.Tensor

# The interpolations timm's data configs name, as PIL resampling filters (F.interpolate takes the same names).
_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def open_image(path: str | Path, owner: str = "") -> Image.Image:
    """Open an image file as RGB, with the file (and what it belongs to) named in any error.

    Args:
        path: the image file.
        owner: what the image belongs to, e.g. ``"sample coco/3/0"``, added to error messages when given.

    Returns:
        The decoded image in RGB (grayscale, palette and RGBA images are converted). Its EXIF data is kept, so
        ``ImageProcessor`` still turns a sideways photo upright.
    """
    path = Path(path)
    where = f" ({owner})" if owner else ""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}{where}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes, so the file can be closed right after
    except OSError as e:  # PIL's UnidentifiedImageError is one
        raise ValueError(f"cannot read image {path}{where}: {e}") from e


@dataclass
class ImageProcessor:
    """Resize to a square and normalize, with the numbers timm's data config gives for the backbone.

    The whole image is resized (no center crop): in captioning and VQA a shape near the border matters as
    much as one in the middle. Photos are turned upright by their EXIF orientation first, as a viewer shows them.
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
            image: a PIL image, a path to an image file, or a tensor ``(3, H, W)`` — float in [0, 1] or uint8.

        Returns:
            A float tensor ``(3, img_size, img_size)``, normalized.
        """
        if isinstance(image, (str, Path)):
            image = open_image(image)
        if isinstance(image, Image.Image):
            # A phone photo is stored sideways with an EXIF tag saying how to turn it; "the object on the left"
            # must mean the left of the picture as seen. No-op for images without the tag.
            image = ImageOps.exif_transpose(image).convert("RGB")
            if image.size != (self.img_size, self.img_size):
                image = image.resize((self.img_size, self.img_size), _PIL_FILTERS[self.interpolation])
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            x = x.view(self.img_size, self.img_size, 3).permute(2, 0, 1).float() / 255.0  # (3, H, W)
        elif isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.size(0) != 3:
                raise ValueError(f"an image tensor must have shape (3, H, W), got {tuple(image.shape)}")
            x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
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
