"""The vision tower: any timm ViT or CNN, used only through timm's public API, returning a grid of tokens."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn
from safetensors import safe_open

from mmgpt.config import VisionConfig
from mmgpt.models.image_processor import ImageProcessor
from mmgpt.models.image_tiling import TilingImageProcessor

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class VisionTower(nn.Module):
    """Encodes images into a grid of tokens ``(B, H' * W', embed_dim)``.

    Features come from level ``feature_layer`` of timm's ``forward_intermediates``: a block of a ViT (prefix
    tokens — CLS and registers — dropped by timm), a feature stage of a CNN; with ``final_norm`` they go through
    the backbone's final norm (SigLIP's post-LayerNorm). Everything after that level (later blocks, the final norm
    unless used, the head) is pruned so no compute is spent on it. The ``(B, C, H', W')`` map is flattened
    row-major into tokens, the order the projector's pixel shuffle expects.

    Weights come from ``checkpoint_path`` (a local file, never a download) or a random init. Images are
    preprocessed as the backbone expects: ``self.processor`` takes mean, std and interpolation from timm's data
    config for the model, or, with ``tiling``, splits pictures into tiles (``image_tiling.TilingImageProcessor``).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        name = config.name
        if not timm.is_model(name):
            raise ValueError(f"vision.name={name!r} is not a timm model (see timm.list_models())")
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
        kwargs = dict(config.overrides)
        # img_size and patch_size are constructor arguments of the models that are built for one input size
        # (ViTs: their position embeddings fix the grid). A CNN takes no such argument and runs at any size.
        fixed_size = pretrained_cfg is None or pretrained_cfg.fixed_input_size
        if fixed_size:
            kwargs.setdefault("img_size", config.img_size)
            if config.patch_size is not None:
                kwargs.setdefault("patch_size", config.patch_size)
        elif config.patch_size is not None:
            raise ValueError(
                f"vision.patch_size={config.patch_size} applies to ViTs; {name} is convolutional and runs at any "
                f"vision.img_size with its own strides: set vision.patch_size to null"
            )

        pretrained, overlay, num_classes = False, None, 0
        if config.checkpoint_path:
            path = Path(config.checkpoint_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"vision.checkpoint_path: no such file {path} (a local timm checkpoint; EfficientNet-Lite0's "
                    f"ImageNet weights are written by scripts/convert_efficientnet_lite0.py)"
                )
            classifier = pretrained_cfg.classifier if pretrained_cfg else None
            # Build the model with the checkpoint's own head, so timm loads *every* tensor strictly (its loader
            # turns strict off, and silently skips missing and unexpected keys, whenever the head size differs).
            # The head is pruned below. timm applies the model's checkpoint filter on the way (ViT position
            # embeddings resampled to img_size), and reads the file with safetensors or torch.load(weights_only=True).
            num_classes = _checkpoint_num_classes(path, classifier)
            pretrained = True
            # With url and hf_hub_id cleared the file is the only weight source timm knows of: nothing is downloaded.
            overlay = dict(file=str(path), url="", hf_hub_id="", source="", num_classes=num_classes)
        try:
            self.model = timm.create_model(
                name, pretrained=pretrained, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs
            )
        except RuntimeError as e:
            if config.checkpoint_path:
                raise ValueError(
                    f"vision.checkpoint_path={config.checkpoint_path} does not fit {name} with overrides "
                    f"{config.overrides}: {_shorten(str(e))}"
                ) from e
            raise

        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"vision.name={name}: this timm model has no forward_intermediates, which mmgpt needs")
        # forward_intermediates indexes the levels listed in feature_info: each block of a ViT, each stage
        # (stride 2, 4, 8, 16, 32) of a CNN.
        num_levels = len(self.model.feature_info)
        blocks = getattr(self.model, "blocks", None)
        unit = "blocks" if blocks is not None and len(blocks) == num_levels else "feature levels"
        layer = config.feature_layer
        if not -num_levels <= layer < num_levels:
            raise ValueError(
                f"vision.feature_layer={layer} is out of range for {name} with {num_levels} {unit} "
                f"(valid: {-num_levels} to {num_levels - 1})"
            )
        self.layer_index = layer % num_levels
        final_norm = getattr(self.model, "norm", None)
        if config.final_norm and (not isinstance(final_norm, nn.Module) or isinstance(final_norm, nn.Identity)):
            raise ValueError(
                f"vision.final_norm=True: {name} has no final norm layer (model.norm) to run over its features; "
                f"set vision.final_norm to false"
            )
        # Drop the levels after the chosen one, the head, and the final norm unless the features go through it:
        # they would never be used.
        self.model.prune_intermediate_layers(
            [self.layer_index], prune_norm=not config.final_norm, prune_head=True
        )

        if config.tiling is not None:
            try:
                self.processor = TilingImageProcessor(tile_size=config.img_size, **config.tiling)
            except (TypeError, ValueError) as e:
                raise ValueError(f"vision.tiling={config.tiling}: {e}") from e
        else:
            data_config = timm.data.resolve_model_data_config(self.model)
            self.processor = ImageProcessor(
                img_size=config.img_size, mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                interpolation=data_config["interpolation"],
            )
        # Probe the output shape in eval mode: in train mode every BatchNorm would fold the statistics of this
        # blank image into its running mean and variance, corrupting pretrained CNN weights.
        self.model.eval()
        with torch.no_grad():
            _, c, h, w = self._feature_map(torch.zeros(1, 3, config.img_size, config.img_size)).shape
        self.model.train()
        self.embed_dim, self.grid_size = c, (h, w)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        kwargs = {"norm": True} if self.config.final_norm else {}
        return self.model.forward_intermediates(
            images, indices=[self.layer_index], intermediates_only=True, **kwargs
        )[0]  # (B, C, H', W')

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, H, W) normalized by self.processor
        return self._feature_map(images).flatten(2).transpose(1, 2)  # (B, H'*W', C)

    def train(self, mode: bool = True) -> VisionTower:
        """Set train mode, keeping each frozen BatchNorm in eval mode.

        In train mode a BatchNorm normalizes with the batch's statistics and overwrites its running ones, so
        ``requires_grad_(False)`` alone would still change a frozen pretrained CNN (and make the features seen in
        training differ from those at inference). A BatchNorm whose parameters are frozen therefore stays in
        eval mode; one without parameters follows the rest of the tower. ViTs have no BatchNorm: no effect.

        Args:
            mode: train (True) or eval (False), as ``nn.Module.train``.
        """
        super().train(mode)
        if mode:
            tower_trains = any(p.requires_grad for p in self.parameters())
            for m in self.modules():
                if isinstance(m, _BATCH_NORMS):
                    params = list(m.parameters(recurse=False))
                    if not (any(p.requires_grad for p in params) if params else tower_trains):
                        m.eval()
        return self


def _checkpoint_num_classes(path: Path, classifier: str | tuple[str, ...] | None) -> int:
    """The output size of the checkpoint's classifier head (0 when it has none), read without running its code.

    A ``.safetensors`` file is read for its header only. Any other file is read as timm reads it: ``torch.load``
    with ``weights_only=True``, which refuses a pickle that needs anything beyond tensors and plain containers.
    """
    names = [classifier] if isinstance(classifier, str) else list(classifier or ())
    key = f"{names[0]}.weight" if names else None
    try:
        if path.name.endswith(".safetensors"):  # the same test as timm's loader
            with safe_open(str(path), framework="pt") as f:
                return f.get_slice(key).get_shape()[0] if key in f.keys() else 0
        state_dict = timm.models.load_state_dict(str(path), weights_only=True)
        return state_dict[key].shape[0] if key in state_dict else 0
    except Exception as e:  # any failure to read (refused pickle, corrupt file, not a dict): say which file
        raise ValueError(
            f"vision.checkpoint_path={path}: cannot read a state dict from it (expected .safetensors, or a "
            f"torch.save'd dict of tensors, which is loaded with weights_only=True): {_shorten(str(e))}"
        ) from e


def _shorten(message: str, limit: int = 1500) -> str:
    """A load error lists every missing and unexpected key; a wrong architecture has hundreds."""
    return message if len(message) <= limit else message[:limit] + f" ... ({len(message) - limit} more characters)"
