"""Import a HF transformers LLaVA checkpoint (``LlavaForConditionalGeneration``) into mmgpt, and export back.

LLaVA-1.5 is mmgpt's architecture with particular parts, so the conversion is a renaming of tensors:

    CLIP vision tower   -> timm ``vit_base_patch16_clip_224`` with its sizes overridden (pre-norm, no patch bias)
    2-layer GELU MLP    -> ``Projector`` with ``input_norm=False``, ``pixel_shuffle=1``, hidden = LM width
    Llama LM            -> the native decoder, through ``mmgpt.convert.hf_llama``

Two details decide whether the numbers match. HF's ``hidden_states`` list starts with the embedding output, so
LLaVA's ``vision_feature_layer=L >= 1`` is block ``L - 1`` in timm's (and ``VisionConfig.feature_layer``'s)
numbering, while negative indices count from the end in both and map unchanged. And LLaVA's "default" feature
strategy drops the CLS token, which is what ``VisionTower`` returns; "full" (CLS kept) is not supported.

What is not carried over: the vision blocks after the feature layer and CLIP's ``post_layernorm`` (neither
reaches LLaVA's logits; mmgpt prunes them), so an exported tower ends at its feature layer
(``vision_feature_layer=-1``) and gets an identity ``post_layernorm``. Preprocessing differs for non-square
images: mmgpt resizes the whole image to a square, CLIP's processor resizes the short side and center-crops
(and LLaVA-1.5's original code pads to a square first); mean/std are CLIP's in both (checked on import).

Only safetensors are read: a ``.bin`` checkpoint is a pickle that can run code. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from mmgpt.config import MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.hf_llama import (
    check_hf_llama_config,
    from_hf_llama_config,
    from_hf_llama_state_dict,
    to_hf_llama_config,
    to_hf_llama_state_dict,
)
from mmgpt.convert.vit_weights import (
    CLIP_LAYOUT,
    HF_ACT_TO_TIMM,
    timm_act_to_hf,
    timm_mlp_ratio,
    vit_from_hf,
    vit_to_hf,
)
from mmgpt.models.mmgpt import MMGPT

# The timm architecture every CLIP tower is built from: pre-norm, no patch-embedding bias, CLS token,
# LayerNorm(eps=1e-5). The sizes come from the LLaVA config as overrides, so the "base/16/224" in the name
# only picks the family (and timm's data config: OpenAI CLIP mean/std, as CLIP's image processor).
TIMM_CLIP = "vit_base_patch16_clip_224"
TIMM_CLIP_LN_EPS = 1e-5  # what timm's vit_*_clip_* models build; a config with another eps cannot be matched
# HF CLIP hidden_act -> timm act_layer (shared by every CLIP-family tower, mmgpt.convert.vit_weights).
CLIP_ACT_TO_TIMM = HF_ACT_TO_TIMM

# Checkpoint key layouts in the wild all reduce to three groups: transformers < 4.52 writes
# ``language_model.model.*``, ``language_model.lm_head.*`` and ``vision_tower.vision_model.*``; 4.52-4.57 write
# ``model.language_model.*``, ``lm_head.*``, ``model.vision_tower.vision_model.*``; 5.x writes the old prefixes
# with ``vision_tower.*`` (no ``vision_model``). Order matters: lm_head before the rest of the language model.
_KEY_GROUPS = (
    ("vision", re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$")),
    ("projector", re.compile(r"^(?:model\.)?multi_modal_projector\.(.+)$")),
    ("lm_head", re.compile(r"^(?:language_model\.)?(lm_head\..+)$")),
    ("language", re.compile(r"^(?:model\.)?language_model\.(?:model\.)?(.+)$")),
)
# Tensors a checkpoint may carry that never reach LLaVA's logits (beyond the blocks after the feature layer):
# CLIP's pooled-output norm, and buffers older transformers saved.
_UNUSED = re.compile(r"^(post_layernorm\..+|embeddings\.position_ids|.*rotary_emb\.inv_freq)$")


# ---------------------------------------------------------------------------------------------------------
# Configs


def _feature_layer_from_hf(layer, num_layers: int) -> int:
    """LLaVA's ``vision_feature_layer`` (an index into HF's ``hidden_states``) -> ``VisionConfig.feature_layer``."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(
            f"vision_feature_layer={layer!r}: only a single int is supported (several layers concatenated "
            f"do not fit mmgpt's VisionTower)"
        )
    # hidden_states = (embedding output, block 0 output, ..., block n-1 output): n + 1 entries.
    n_states = num_layers + 1
    if not -n_states <= layer < n_states:
        raise ValueError(
            f"vision_feature_layer={layer} is out of range for a vision tower of {num_layers} layers "
            f"(expected {-n_states}..{num_layers})"
        )
    if layer % n_states == 0:
        raise ValueError(
            f"vision_feature_layer={layer} selects the embedding output (before any layer); mmgpt's "
            f"VisionConfig.feature_layer indexes blocks, so expected 1..{num_layers} or -1..{-num_layers}"
        )
    # Negative indices count from the end in both lists; a positive one is shifted by the embedding entry.
    return layer if layer < 0 else layer - 1


def mmgpt_config_from_llava(llava_config) -> MMGPTConfig:
    """The ``MMGPTConfig`` of a LLaVA model, or a ``ValueError`` naming every field that does not fit.

    Args:
        llava_config: a ``transformers.LlavaConfig`` (CLIP vision tower, Llama language model).

    Returns:
        A config whose ``MMGPT`` computes the same logits once ``import_llava`` has copied the weights.
    """
    vc, tc = llava_config.vision_config, llava_config.text_config
    problems = []
    if vc.model_type != "clip_vision_model":
        problems.append(f"vision_config.model_type={vc.model_type!r} (expected 'clip_vision_model')")
    if llava_config.vision_feature_select_strategy != "default":
        problems.append(
            f"vision_feature_select_strategy={llava_config.vision_feature_select_strategy!r} (expected 'default': "
            f"mmgpt's VisionTower returns patch tokens only, so 'full', which keeps CLS, does not fit)"
        )
    if llava_config.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act={llava_config.projector_hidden_act!r} (expected 'gelu')")
    if problems:  # the vision fields below are only meaningful for a CLIP tower
        raise ValueError("the LLaVA config does not fit mmgpt: " + "; ".join(problems))
    if vc.hidden_act not in CLIP_ACT_TO_TIMM:
        problems.append(f"vision_config.hidden_act={vc.hidden_act!r} (expected one of {sorted(CLIP_ACT_TO_TIMM)})")
    if vc.layer_norm_eps != TIMM_CLIP_LN_EPS:
        problems.append(
            f"vision_config.layer_norm_eps={vc.layer_norm_eps} (expected {TIMM_CLIP_LN_EPS}, as timm's CLIP models)"
        )
    if vc.num_channels != 3:
        problems.append(f"vision_config.num_channels={vc.num_channels} (expected 3)")
    if vc.image_size % vc.patch_size:
        problems.append(f"vision_config.image_size={vc.image_size} is not a multiple of patch_size={vc.patch_size}")
    # timm sizes the MLP as int(embed_dim * mlp_ratio): the ratio must give back the exact width.
    mlp_ratio = timm_mlp_ratio(vc.hidden_size, vc.intermediate_size)
    if mlp_ratio is None:
        problems.append(f"vision_config.intermediate_size={vc.intermediate_size} is not reachable as a timm mlp_ratio")
    try:
        feature_layer = _feature_layer_from_hf(llava_config.vision_feature_layer, vc.num_hidden_layers)
    except ValueError as e:
        problems.append(str(e))
    try:
        check_hf_llama_config(tc, where="text_config")
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("the LLaVA config does not fit mmgpt: " + "; ".join(problems))
    vision = VisionConfig(
        name=TIMM_CLIP,
        img_size=vc.image_size,
        patch_size=vc.patch_size,
        overrides=dict(
            embed_dim=vc.hidden_size, depth=vc.num_hidden_layers, num_heads=vc.num_attention_heads,
            mlp_ratio=mlp_ratio, act_layer=CLIP_ACT_TO_TIMM[vc.hidden_act], pre_norm=True,
        ),
        feature_layer=feature_layer,
    )
    decoder = from_hf_llama_config(tc)
    # LLaVA decides the tie at the top level (transformers copies a tied text_config up to it).
    decoder.tie_embeddings = bool(llava_config.tie_word_embeddings)
    return MMGPTConfig(
        vision=vision,
        projector=ProjectorConfig(pixel_shuffle=1, hidden_dim=tc.hidden_size, input_norm=False),
        decoder=decoder,
        # image_token_id in transformers >= 4.48 (an alias), image_token_index before.
        image_token_id=getattr(llava_config, "image_token_id", None) or llava_config.image_token_index,
    )


def _export_problems(model: MMGPT) -> list[str]:
    """Everything about ``model`` that a LLaVA (CLIP + GELU MLP + Llama) cannot express."""
    problems = []
    pc, dc = model.config.projector, model.config.decoder
    if pc.input_norm:
        problems.append("projector.input_norm=True (LLaVA's projector has no input LayerNorm)")
    if pc.pixel_shuffle != 1:
        problems.append(f"projector.pixel_shuffle={pc.pixel_shuffle} (LLaVA has none: expected 1)")
    if pc.pos_embed:
        problems.append("projector.pos_embed=True (LLaVA's projector has no slot embedding)")
    if pc.mlp_depth != 2:
        problems.append(f"projector.mlp_depth={pc.mlp_depth} (LLaVA's projector is a 2-layer MLP)")
    if not pc.bias:
        problems.append("projector.bias=False (expected the biases LLaVA's projector saves)")
    if pc.hidden_dim not in (None, dc.n_embd):
        problems.append(f"projector.hidden_dim={pc.hidden_dim} (LLaVA's is the decoder width {dc.n_embd})")
    if model.config.vision.final_norm:
        problems.append("vision.final_norm=True (LLaVA's features skip the tower's final norm)")
    # An HF decoder (decoder.hf_path / hf_config) has its own layout; only the native Llama-style one converts.
    if dc.backend == "hf":
        problems.append("decoder.hf_path/hf_config: a transformers decoder (expected mmgpt's native decoder)")
    if dc.attention != "causal":
        problems.append(f"decoder.attention={dc.attention!r} (LLaVA is causal)")
    vit = model.vision.model
    if not isinstance(vit, VisionTransformer):
        problems.append(f"vision.name={model.config.vision.name!r} is not a timm VisionTransformer (CLIP is one)")
        return problems
    name = f"vision.name={model.config.vision.name!r}"
    if vit.cls_token is None or vit.num_prefix_tokens != 1:
        problems.append(f"{name}: CLIP has exactly one prefix token (CLS), this has {vit.num_prefix_tokens}")
    if vit.no_embed_class or vit.pos_embed is None:
        problems.append(f"{name}: CLIP's position embedding covers the CLS token too")
    if not isinstance(vit.norm_pre, nn.LayerNorm):
        problems.append(f"{name}: CLIP normalizes the embeddings before the blocks (timm pre_norm=True)")
    if vit.patch_embed.proj.bias is not None or not isinstance(vit.patch_embed.norm, nn.Identity):
        problems.append(f"{name}: CLIP's patch embedding has no bias and no norm")
    if vit.patch_embed.proj.in_channels != 3:
        problems.append(f"{name}: expected 3 input channels")
    grid, patch = vit.patch_embed.grid_size, vit.patch_embed.patch_size
    if grid[0] != grid[1] or patch[0] != patch[1]:
        problems.append(f"{name}: CLIP's patch grid and patches are square, got {grid} and {patch}")
    eps = getattr(vit.norm_pre, "eps", None)
    for i, block in enumerate(vit.blocks):
        where = f"{name} block {i}"
        if type(block) is not Block:
            problems.append(f"{where} is a {type(block).__name__} (expected timm's plain Block)")
            continue
        attn, mlp = block.attn, block.mlp
        extras = [m for m in (attn.q_norm, attn.k_norm, attn.norm, block.ls1, block.ls2, mlp.norm)
                  if not isinstance(m, nn.Identity)]
        if extras:
            problems.append(f"{where} has layers CLIP lacks: {sorted({type(m).__name__ for m in extras})}")
        norms = (block.norm1, block.norm2)
        if not all(isinstance(n, nn.LayerNorm) and n.eps == eps for n in norms):
            problems.append(f"{where}: expected LayerNorms with the embedding norm's eps={eps}")
        if attn.qkv.out_features != 3 * vit.embed_dim:
            problems.append(f"{where}: CLIP's attention width is the embedding width {vit.embed_dim}")
        if type(mlp) is not Mlp or timm_act_to_hf(mlp.act) is None:
            problems.append(f"{where}: expected a 2-layer MLP (timm Mlp) with GELU, tanh-GELU or QuickGELU")
        elif timm_act_to_hf(mlp.act) != timm_act_to_hf(vit.blocks[0].mlp.act):
            problems.append(f"{where}: a different activation than block 0")
    return problems


def llava_config_from_mmgpt(model: MMGPT):
    """The ``transformers.LlavaConfig`` of an mmgpt model, or a ``ValueError`` naming every part that does not fit.

    Args:
        model: an ``MMGPT`` with a CLIP-style timm ViT, ``input_norm=False``, ``pixel_shuffle=1`` and causal attention.

    Returns:
        A config for a LLaVA whose vision tower ends at mmgpt's feature layer (``vision_feature_layer=-1``).
    """
    from transformers import CLIPVisionConfig, LlavaConfig

    problems = _export_problems(model)
    if problems:
        raise ValueError("this model does not fit LLaVA's architecture: " + "; ".join(problems))
    vit = model.vision.model
    block = vit.blocks[0]
    vision_config = CLIPVisionConfig(
        hidden_size=vit.embed_dim,
        intermediate_size=block.mlp.fc1.out_features,
        # Only the blocks up to the feature layer exist in mmgpt (the rest were pruned), and the last of them is
        # the feature layer: hidden_states[-1].
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=block.attn.num_heads,
        num_channels=3,
        image_size=vit.patch_embed.img_size[0],
        patch_size=vit.patch_embed.patch_size[0],
        hidden_act=timm_act_to_hf(block.mlp.act),
        layer_norm_eps=vit.norm_pre.eps,
    )
    dc = model.config.decoder
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=to_hf_llama_config(dc),
        image_token_index=model.config.image_token_id,
        image_seq_length=model.image_seq_len,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=dc.tie_embeddings,
    )
    config.dtype = model.decoder.wte.weight.dtype  # from_pretrained(dtype="auto") then loads what was saved
    return config


# ---------------------------------------------------------------------------------------------------------
# Weights


def _clip_from_hf(hf: dict[str, torch.Tensor], n_blocks: int, where: str) -> dict[str, torch.Tensor]:
    """HF CLIP vision tensors (keys relative to the vision model) -> timm ViT state dict for ``n_blocks`` blocks.

    Every tensor must find a place, except those that never reach LLaVA's logits: the layers after the feature
    layer, CLIP's pooled-output norm, and buffers older transformers saved.
    """
    out, hf = vit_from_hf(hf, n_blocks, CLIP_LAYOUT)
    later = re.compile(r"^encoder\.layers\.(\d+)\.")
    left = [k for k in hf if not _UNUSED.match(k) and not ((m := later.match(k)) and int(m.group(1)) >= n_blocks)]
    if left:
        raise ValueError(f"{where}: vision tower tensors the LLaVA config has no place for: {sorted(left)[:10]}")
    return out


def _clip_to_hf(sd: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """timm ViT state dict -> HF CLIP vision tensors (keys relative to the vision model)."""
    out, left = vit_to_hf(sd, n_blocks)
    if left:
        raise ValueError(f"the vision tower has tensors CLIP has no place for: {sorted(left)}")
    norm_w = out["pre_layrnorm.weight"]
    # Not part of mmgpt (pruned) and not on LLaVA's path (it normalizes CLIP's pooled output only).
    out["post_layernorm.weight"] = torch.ones_like(norm_w)
    out["post_layernorm.bias"] = torch.zeros_like(norm_w)
    return out


def _split_llava_tensors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Sort a LLaVA checkpoint's tensors into vision / projector / language (``LlamaForCausalLM`` keys)."""
    groups: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "language": {}}
    unknown = []
    for key, value in tensors.items():
        for group, pattern in _KEY_GROUPS:
            m = pattern.match(key)
            if m:
                rest = m.group(1)
                if group == "lm_head":
                    groups["language"][rest] = value
                elif group == "language":
                    groups["language"]["model." + rest] = value
                else:
                    groups[group][rest] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{where}: tensors that are not part of a LLaVA model: {unknown[:10]}")
    return groups


def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(hf_dir.glob("pytorch_model*.bin")):
        raise ValueError(
            f"{hf_dir}: only safetensors are read (a .bin checkpoint is a pickle that can run code); re-save it "
            f"with save_pretrained(..., safe_serialization=True)"
        )
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        tensors.update(load_file(str(hf_dir / name)))
    return tensors


def read_llava_config(hf_dir: str | Path):
    """Read ``config.json`` of a saved ``LlavaForConditionalGeneration`` (local only, nothing is downloaded).

    Args:
        hf_dir: the directory ``save_pretrained`` wrote.

    Returns:
        A ``transformers.LlavaConfig``.
    """
    from transformers import LlavaConfig

    file = Path(hf_dir) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a saved HF model: config.json is missing")
    model_type = json.loads(file.read_text()).get("model_type")
    if model_type != "llava":
        raise ValueError(f"{file}: model_type={model_type!r}, expected 'llava' (LlavaForConditionalGeneration)")
    return LlavaConfig.from_pretrained(str(hf_dir), local_files_only=True)


def _saved_image_processor(hf_dir: Path) -> dict | None:
    """The image processor config saved next to the model: its own file, or (transformers 5) in the processor's."""
    single, joint = hf_dir / "preprocessor_config.json", hf_dir / "processor_config.json"
    if single.is_file():
        return json.loads(single.read_text())
    if joint.is_file():
        return json.loads(joint.read_text()).get("image_processor")
    return None


def check_image_processor(hf_dir: str | Path, model: MMGPT) -> list[str]:
    """Compare the normalization of the image processor saved in ``hf_dir`` with the one mmgpt will use.

    mmgpt takes mean/std from timm's data config of the CLIP architecture (OpenAI CLIP's numbers), so a LLaVA
    trained with other numbers would see shifted inputs. Resizing differs by design (see the module docstring).

    Args:
        hf_dir: the LLaVA directory.
        model: the imported model.

    Returns:
        One message per mismatching field (empty when none, or when no processor config was saved); each is
        also issued as a ``UserWarning``.
    """
    saved = _saved_image_processor(Path(hf_dir))
    if not saved:
        return []
    ours = model.processor
    messages = []
    for field, mine in (("image_mean", ours.mean), ("image_std", ours.std)):
        theirs = saved.get(field)
        if theirs is not None and not torch.allclose(torch.tensor(theirs).double(), torch.tensor(mine).double()):
            messages.append(
                f"{hf_dir}: the saved image processor's {field}={list(theirs)} differs from mmgpt's {list(mine)} "
                f"(timm's data config for {model.config.vision.name}); normalize images yourself to match"
            )
    for message in messages:
        warnings.warn(message, stacklevel=3)
    return messages


def import_llava(hf_dir: str | Path, dtype: torch.dtype | None = None) -> MMGPT:
    """Load a saved HF ``LlavaForConditionalGeneration`` (CLIP + Llama) as an ``MMGPT`` with the same logits.

    Feed it ``image_seq_len`` ``<image>`` tokens per image (LLaVA's ``image_token_index``) and pixels
    normalized as ``model.processor`` does.

    Args:
        hf_dir: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
        dtype: cast the weights to this dtype (default: float32, as every freshly built mmgpt model).

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: the config does not fit mmgpt (naming every field), or the checkpoint lacks a tensor the
            config implies or holds one it has no place for.
    """
    hf_dir = Path(hf_dir)
    llava_config = read_llava_config(hf_dir)
    config = mmgpt_config_from_llava(llava_config)
    groups = _split_llava_tensors(_read_safetensors(hf_dir), str(hf_dir))
    model = MMGPT(config)
    n_blocks = len(model.vision.model.blocks)  # VisionTower pruned the blocks after the feature layer
    projector, language = dict(groups["projector"]), groups["language"]
    hidden = config.decoder.n_embd
    try:
        state = {"vision.model." + k: v for k, v in _clip_from_hf(groups["vision"], n_blocks, str(hf_dir)).items()}
        for i, j in ((1, 0), (2, 2)):  # linear_1 -> mlp[0], GELU is mlp[1], linear_2 -> mlp[2]
            state[f"projector.mlp.{j}.weight"] = projector.pop(f"linear_{i}.weight")
            # multimodal_projector_bias=False: a zero bias computes the same function.
            state[f"projector.mlp.{j}.bias"] = projector.pop(f"linear_{i}.bias", torch.zeros(hidden))
        decoder = from_hf_llama_state_dict(language, config.decoder)
    except KeyError as e:
        raise ValueError(f"{hf_dir}: the checkpoint has no tensor {e.args[0]!r}, which the LLaVA config implies") from e
    state.update({"decoder." + k: v for k, v in decoder.items()})
    used = set(to_hf_llama_state_dict(decoder, config.decoder)) | {"lm_head.weight"}  # a tied head may be saved
    left = [f"multi_modal_projector.{k}" for k in projector]
    left += [f"language_model {k}" for k in language if k not in used and not _UNUSED.match(k)]
    if left:
        raise ValueError(f"{hf_dir}: tensors the LLaVA config has no place for: {sorted(left)[:10]}")
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    check_image_processor(hf_dir, model)
    return model.eval()


def llava_state_dict(model: MMGPT) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` under ``LlavaForConditionalGeneration``'s checkpoint keys.

    The keys are the layout transformers < 4.52 wrote (``language_model.model.*``,
    ``vision_tower.vision_model.*``), which every later version still loads.

    Args:
        model: an ``MMGPT`` that fits LLaVA (see ``llava_config_from_mmgpt``).
    """
    problems = _export_problems(model)
    if problems:
        raise ValueError("this model does not fit LLaVA's architecture: " + "; ".join(problems))
    sd = model.state_dict()
    part = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
    out = {
        "vision_tower.vision_model." + k: v
        for k, v in _clip_to_hf(part("vision.model."), len(model.vision.model.blocks)).items()
    }
    projector = part("projector.mlp.")
    out.update({
        "multi_modal_projector.linear_1.weight": projector["0.weight"],
        "multi_modal_projector.linear_1.bias": projector["0.bias"],
        "multi_modal_projector.linear_2.weight": projector["2.weight"],
        "multi_modal_projector.linear_2.bias": projector["2.bias"],
    })
    for k, v in to_hf_llama_state_dict(part("decoder."), model.config.decoder).items():
        out["language_model." + k] = v  # model.* and (untied) lm_head.weight
    # Cloned: the q/k/v (and gate/up) pieces are views into one fused tensor, which safetensors refuses to save.
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export_llava(model: MMGPT, out_dir: str | Path) -> None:
    """Write ``model`` as a directory that ``LlavaForConditionalGeneration.from_pretrained`` loads with the same
    logits: ``config.json``, ``model.safetensors``, and ``preprocessor_config.json`` (mmgpt's resize + mean/std).

    The vision tower ends at mmgpt's feature layer (``vision_feature_layer=-1``): the blocks after it were never
    part of the mmgpt model. No tokenizer is written (save the model's own next to it for HF ``generate``).

    Args:
        model: an ``MMGPT`` with a CLIP-style timm ViT, ``projector.input_norm=False``,
            ``projector.pixel_shuffle=1`` and causal attention.
        out_dir: the directory to write (created if missing).

    Raises:
        ValueError: naming every part of the model that LLaVA's architecture cannot express.
    """
    from transformers import CLIPImageProcessor

    config = llava_config_from_mmgpt(model)
    tensors = llava_state_dict(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    p = model.processor
    # mmgpt squashes the whole image to a square (no crop), resampling with the backbone's filter (HF stores
    # it as PIL's number).
    resample = Image.Resampling[getattr(p, "interpolation", "bicubic").upper()].value
    CLIPImageProcessor(
        size={"height": p.img_size, "width": p.img_size}, do_center_crop=False, resample=resample,
        image_mean=list(p.mean), image_std=list(p.std),
    ).save_pretrained(str(out_dir))


__all__ = [
    "import_llava", "export_llava", "mmgpt_config_from_llava", "llava_config_from_mmgpt", "llava_state_dict",
    "read_llava_config", "check_image_processor",
]
