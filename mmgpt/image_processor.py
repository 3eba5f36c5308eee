"""Turns a PIL image, an image path or a tensor into the normalized ``(3, H, W)`` tensor the vision tower expects."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

ImageInput = Image.Image | str | Path | torch.Tensor


@dataclass
class ImageProcessor:
    """Resize to a square and normalize, with the numbers timm's data config gives for the backbone.

    The whole image is resized (no center crop): in captioning and VQA a shape near the border matters as
    much as one in the middle.
    """

    img_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        """Process one image.

        Args:
            image: a PIL image, a path to an image file, or a tensor ``(3, H, W)`` — float in [0, 1] or uint8.

        Returns:
            A float tensor ``(3, img_size, img_size)``, normalized.
        """
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image file not found: {path}")
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except OSError as e:
                raise ValueError(f"{path}: cannot read as an image ({e})") from e
        if isinstance(image, Image.Image):
            image = image.convert("RGB").resize((self.img_size, self.img_size), Image.BICUBIC)
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            x = x.view(self.img_size, self.img_size, 3).permute(2, 0, 1).float() / 255.0  # (3, H, W)
        elif isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.size(0) != 3:
                raise ValueError(f"an image tensor must have shape (3, H, W), got {tuple(image.shape)}")
            x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
            if x.shape[-2:] != (self.img_size, self.img_size):
                x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="bicubic", antialias=True)[0]
        else:
            raise TypeError(f"expected a PIL image, a path or a (3, H, W) tensor, got {type(image).__name__}")
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
