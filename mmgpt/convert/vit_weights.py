"""HF CLIP-family vision encoders <-> timm ``VisionTransformer`` state dicts, for every converter that needs one.

transformers writes CLIP, SigLIP and the SigLIP towers of Idefics3/SmolVLM with the same tensor names: an
``embeddings`` module (a patch ``Conv2d``, a position ``nn.Embedding``, CLIP's class embedding), pre-norm
``encoder.layers.{i}`` (``layer_norm1``, ``self_attn.{q,k,v,out}_proj``, ``layer_norm2``, ``mlp.fc1/fc2``), and
optional norms before the blocks (CLIP's ``pre_layrnorm``, sic) and after them (``post_layernorm``). timm's ViT
is the same computation with q, k, v fused into one matmul, so the conversion is renaming and concatenation.

The towers differ only in which optional parts they have, and the caller says which (``ViTLayout``): CLIP has a
CLS token and a pre-norm but no patch bias; SigLIP has a patch bias, no CLS token, and (for Idefics3) its
features go through the post-norm. A part the layout names must be in the checkpoint (``KeyError`` otherwise);
whatever the layout does not use is handed back, so the caller can refuse tensors it has no place for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers.activations import GELU, GELUTanh, QuickGELU

# HF hidden_act -> timm act_layer. gelu_new is the tanh approximation written out (same function).
HF_ACT_TO_TIMM = {
    "quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
}


@dataclass(frozen=True)
class ViTLayout:
    """The optional parts of a CLIP-family tower, each present in both the HF checkpoint and the timm model."""

    class_token: bool  # CLIP's CLS token (embeddings.class_embedding), first in the position embedding
    patch_bias: bool  # a bias on the patch Conv2d (SigLIP)
    pre_norm: bool  # a LayerNorm before the blocks (CLIP's pre_layrnorm -> timm norm_pre)
    final_norm: bool  # the LayerNorm after the blocks is used (post_layernorm -> timm norm)


CLIP_LAYOUT = ViTLayout(class_token=True, patch_bias=False, pre_norm=True, final_norm=False)
# SigLIP as Idefics3/SmolVLM use it: its features are the post-LayerNorm output of the last block.
SIGLIP_LAYOUT = ViTLayout(class_token=False, patch_bias=True, pre_norm=False, final_norm=True)


def timm_mlp_ratio(hidden_size: int, intermediate_size: int) -> float | None:
    """An ``mlp_ratio`` for which timm's ``int(embed_dim * mlp_ratio)`` gives ``intermediate_size`` back exactly.

    The plain quotient can land a hair under the integer (1152 * (4304 / 1152) = 4303.999...); half a unit more
    always truncates to it. ``None`` if neither does (it always does for positive sizes).
    """
    for ratio in (intermediate_size / hidden_size, (intermediate_size + 0.5) / hidden_size):
        if int(hidden_size * ratio) == intermediate_size:
            return ratio
    return None


def timm_act_to_hf(act: nn.Module) -> str | None:
    """timm's MLP activation module -> HF ``hidden_act`` (``None`` for one HF's CLIP-family towers lack)."""
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, GELU) or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    if isinstance(act, GELUTanh) or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_pytorch_tanh"
    return None


def vit_from_hf(
    hf: dict[str, torch.Tensor], n_blocks: int, layout: ViTLayout, position_ids: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """HF vision tensors (keys relative to the vision model) -> a timm ViT state dict for ``n_blocks`` blocks.

    Args:
        hf: ``embeddings.*``, ``encoder.layers.*``, ``pre_layrnorm.*``, ``post_layernorm.*`` as HF names them.
        n_blocks: how many blocks the timm model has (the first ``n_blocks`` HF layers).
        layout: which optional parts the tower has.
        position_ids: ``(num_patches,)``: the row of HF's position table each patch reads, where that is not
            simply patch ``i`` -> row ``i`` (Idefics3 buckets positions, see ``mmgpt.convert.idefics3``).

    Returns:
        ``(state_dict, left)``: the timm tensors, and the HF tensors not used (later layers, a norm the layout
        does not use, buffers), for the caller to accept or refuse.

    Raises:
        KeyError: a tensor the layout implies is missing (its HF name).
    """
    hf = dict(hf)  # popped as used
    pos = hf.pop("embeddings.position_embedding.weight")  # (N or 1 + N, D)
    if position_ids is not None:
        pos = pos[position_ids]
    out = {
        # (1, N, D), or (1, 1 + N, D) with the CLS position first; patches in row-major order in both.
        "pos_embed": pos.unsqueeze(0),
        "patch_embed.proj.weight": hf.pop("embeddings.patch_embedding.weight"),  # (D, 3, p, p)
    }
    if layout.class_token:
        out["cls_token"] = hf.pop("embeddings.class_embedding").reshape(1, 1, -1)  # (1, 1, D)
    if layout.patch_bias:
        out["patch_embed.proj.bias"] = hf.pop("embeddings.patch_embedding.bias")
    for x in ("weight", "bias"):
        if layout.pre_norm:
            out[f"norm_pre.{x}"] = hf.pop(f"pre_layrnorm.{x}")
        if layout.final_norm:
            out[f"norm.{x}"] = hf.pop(f"post_layernorm.{x}")
    for i in range(n_blocks):
        h, b = f"encoder.layers.{i}.", f"blocks.{i}."
        for x in ("weight", "bias"):
            # timm fuses q, k, v into one matmul, in that order: (3D, D).
            out[b + f"attn.qkv.{x}"] = torch.cat([hf.pop(h + f"self_attn.{n}_proj.{x}") for n in "qkv"])
            out[b + f"attn.proj.{x}"] = hf.pop(h + f"self_attn.out_proj.{x}")
            out[b + f"norm1.{x}"] = hf.pop(h + f"layer_norm1.{x}")
            out[b + f"norm2.{x}"] = hf.pop(h + f"layer_norm2.{x}")
            out[b + f"mlp.fc1.{x}"] = hf.pop(h + f"mlp.fc1.{x}")
            out[b + f"mlp.fc2.{x}"] = hf.pop(h + f"mlp.fc2.{x}")
    return out, hf


def vit_to_hf(sd: dict[str, torch.Tensor], n_blocks: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A timm ViT state dict -> HF vision tensors (keys relative to the vision model), the inverse of ``vit_from_hf``
    for the parts the model has (its layout is read off the keys).

    A ViT built with ``qkv_bias=False`` has no q/k/v biases; they are written as zeros (the same function).

    Returns:
        ``(hf_tensors, left)``: the HF tensors, and the timm tensors no HF CLIP-family tower has a place for.
    """
    sd = dict(sd)  # popped as used, so that a tensor HF has no place for is found, not silently dropped
    out = {
        "embeddings.position_embedding.weight": sd.pop("pos_embed")[0],
        "embeddings.patch_embedding.weight": sd.pop("patch_embed.proj.weight"),
    }
    if "cls_token" in sd:
        out["embeddings.class_embedding"] = sd.pop("cls_token").flatten()
    if "patch_embed.proj.bias" in sd:
        out["embeddings.patch_embedding.bias"] = sd.pop("patch_embed.proj.bias")
    for x in ("weight", "bias"):
        if f"norm_pre.{x}" in sd:
            out[f"pre_layrnorm.{x}"] = sd.pop(f"norm_pre.{x}")
        if f"norm.{x}" in sd:
            out[f"post_layernorm.{x}"] = sd.pop(f"norm.{x}")
    for i in range(n_blocks):
        h, b = f"encoder.layers.{i}.", f"blocks.{i}."
        qkv_w = sd.pop(b + "attn.qkv.weight")
        qkv_b = sd.pop(b + "attn.qkv.bias", None)
        qkv_b = torch.zeros(qkv_w.size(0), dtype=qkv_w.dtype, device=qkv_w.device) if qkv_b is None else qkv_b
        for n, w, bias in zip("qkv", qkv_w.chunk(3), qkv_b.chunk(3), strict=True):
            out[h + f"self_attn.{n}_proj.weight"], out[h + f"self_attn.{n}_proj.bias"] = w, bias
        for x in ("weight", "bias"):
            out[h + f"self_attn.out_proj.{x}"] = sd.pop(b + f"attn.proj.{x}")
            out[h + f"layer_norm1.{x}"] = sd.pop(b + f"norm1.{x}")
            out[h + f"layer_norm2.{x}"] = sd.pop(b + f"norm2.{x}")
            out[h + f"mlp.fc1.{x}"] = sd.pop(b + f"mlp.fc1.{x}")
            out[h + f"mlp.fc2.{x}"] = sd.pop(b + f"mlp.fc2.{x}")
    return out, sd


__all__ = [
    "HF_ACT_TO_TIMM", "ViTLayout", "CLIP_LAYOUT", "SIGLIP_LAYOUT", "timm_mlp_ratio", "timm_act_to_hf",
    "vit_from_hf", "vit_to_hf",
]
