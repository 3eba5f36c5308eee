"""The vision tower: any timm model, used only through timm's public API, returning patch tokens."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn

from mmgpt.config import VisionConfig
from mmgpt.image_processor import ImageProcessor


class VisionTower(nn.Module):
    """Encodes images into a grid of patch tokens ``(B, H' * W', embed_dim)``.

    Features come from block ``feature_layer`` via timm's ``forward_intermediates`` (prefix tokens — CLS and
    registers — dropped by timm), and the blocks after it are pruned so no compute is spent on them. The same
    path takes CNN feature maps: any ``(B, C, H', W')`` output is flattened into tokens.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        kwargs = dict(config.overrides)
        kwargs.setdefault("img_size", config.img_size)
        if config.patch_size is not None:
            kwargs.setdefault("patch_size", config.patch_size)
        pretrained, overlay = False, None
        if config.checkpoint_path:
            path = Path(config.checkpoint_path)
            if not path.is_file():
                raise FileNotFoundError(f"vision.checkpoint_path: no such file {path}")
            # timm reads a local file with weights_only=True (or safetensors) and applies the model's own
            # checkpoint filter (position-embedding resampling, head removal). Nothing is downloaded.
            pretrained, overlay = True, {"file": str(path)}
        try:
            self.model = timm.create_model(
                config.name, pretrained=pretrained, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs
            )
        except RuntimeError as e:
            if config.checkpoint_path:
                msg = f"vision.checkpoint_path={config.checkpoint_path} does not fit {config.name}: {e}"
                raise ValueError(msg) from e
            raise
        num_blocks = len(getattr(self.model, "blocks", None) or getattr(self.model, "stages", None) or [])
        layer = config.feature_layer
        if num_blocks and not -num_blocks <= layer < num_blocks:
            raise ValueError(f"vision.feature_layer={layer} is out of range for {config.name} with {num_blocks} blocks")
        self.layer_index = layer % num_blocks if num_blocks else layer
        # Drop the blocks after the chosen layer, the final norm and the head: they would never be used.
        self.model.prune_intermediate_layers([self.layer_index], prune_norm=True, prune_head=True)
        data_config = timm.data.resolve_model_data_config(self.model)
        self.processor = ImageProcessor(
            img_size=config.img_size, mean=tuple(data_config["mean"]), std=tuple(data_config["std"])
        )
        with torch.no_grad():
            _, c, h, w = self._feature_map(torch.zeros(1, 3, config.img_size, config.img_size)).shape
        self.embed_dim, self.grid_size = c, (h, w)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_intermediates(
            images, indices=[self.layer_index], intermediates_only=True
        )[0]  # (B, C, H', W')

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, H, W) normalized by self.processor
        return self._feature_map(images).flatten(2).transpose(1, 2)  # (B, H'*W', C)
