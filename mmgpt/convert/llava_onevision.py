"""Import a HF LLaVA-OneVision checkpoint (``LlavaOnevisionForConditionalGeneration``) into mmgpt's own modules.

LLaVA-OneVision is LLaVA with pictures of any size (``mmgpt.models.anyres``), so the conversion is a renaming of
tensors plus one new part:

    SigLIP vision tower   -> timm ``vit_base_patch16_siglip_gap_224`` with its sizes overridden, the blocks up to
                             ``vision_feature_layer`` and no post-LayerNorm (HF reads ``hidden_states[layer]``)
    multi_modal_projector -> ``Projector``: LLaVA's Linear-GELU-Linear, hidden width = LM width (``input_norm=False``)
    image_newline         -> ``model.packer`` (``vision.anyres``): unpadding, pooling and a newline per row, after
                             the projector
    Qwen2 text model      -> transformers' own ``Qwen2ForCausalLM`` as the decoder (``decoder.backend="hf"``)

A picture is ``1 + rows * cols`` tiles (``model.processor``: an ``AnyresImageProcessor``), each through tower and
projector on its own, then packed into ``model.num_image_tokens(image)`` tokens, a count that depends on the
picture's size. The model is a plain ``MMGPT`` with ``vision.anyres`` set: ``encode_images`` returns every
picture's tokens in a row, ``(total_tokens, n_embd)``, and ``embed`` splices them into the ``<image>`` placeholders
in order, so the generation engine takes them as ``image_embeds``, and ``save_exported`` / ``load_exported`` write
and read it as any mmgpt model. The prompt holds each picture's count of placeholders
(``anyres.repeat_image_markers``), as ``LlavaOnevisionProcessor`` writes it; ``mmgpt.load(hf_dir)`` renders it
with the processor's chat template. Several pictures in one prompt are each taken whole (not split into tiles), as
HF's processor takes them.

Details that decide whether the numbers match:

- HF's ``hidden_states`` list starts with the embedding output: ``vision_feature_layer=L >= 1`` is block ``L - 1``
  in timm's numbering, negative indices map unchanged (``mmgpt.convert.llava``). SigLIP has no CLS token: the
  strategy must be ``"full"`` (``"default"`` would drop a patch token, and HF's own packing then fails).
- SigLIP's ``hidden_states[-1]`` is the last block's output *before* ``post_layernorm`` (transformers does not tie
  it to ``last_hidden_state`` for SigLIP): ``vision.final_norm`` is off, and ``post_layernorm`` is not used.
- Positions count from 0 in HF's Qwen2 and in mmgpt alike.
- Pixels: ``AnyresImageProcessor`` runs the same resizes as transformers' torchvision backend (its default) or its
  PIL backend (``backend="pil"``), and equals the chosen one bit for bit.

Not supported (named by ``mmgpt_config_from_llava_onevision``): several vision feature layers concatenated, a text
model other than Qwen2, ``vision_aspect_ratio`` other than ``anyres_max_N``. Videos are not read (mmgpt has no video
input); a checkpoint's video token is simply an unused word.

Export (``export_llava_onevision``, ``mmgpt convert llava-onevision export``) writes such a model, fine-tuned or not,
back as a HF directory with the same logits: the vision tower as the blocks mmgpt kept, read at its last one
(``vision_feature_layer=-1``, which computes what an earlier layer of the original did), an identity
``post_layernorm`` (HF builds one; LLaVA-OneVision never reads it), and a ``LlavaOnevisionProcessor`` that tiles,
counts and renders prompts as ``model.processor`` and the tokenizer do.

Only safetensors are read: a ``.bin`` checkpoint is a pickle that can run code. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mmgpt.config import AnyresConfig, DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.hf_causal_lm import names_model
from mmgpt.convert.idefics3 import TIMM_SIGLIP, TIMM_SIGLIP_LN_EPS, _saved_chat_template, _saved_processor
from mmgpt.convert.llava import _feature_layer_from_hf, _read_safetensors
from mmgpt.convert.vit_weights import (
    HF_ACT_TO_TIMM,
    ViTLayout,
    timm_act_to_hf,
    timm_mlp_ratio,
    vit_from_hf,
    vit_to_hf,
)
from mmgpt.finite_weights import check_finite
from mmgpt.models.anyres import AnyresImageProcessor
from mmgpt.models.image_tiling import RESAMPLE_NAMES
from mmgpt.models.mmgpt import MMGPT
from mmgpt.prompts import IMAGE
from mmgpt.tokenizer import load_vlm_tokenizer

ARCHITECTURES = ("LlavaOnevisionForConditionalGeneration",)
MODEL_TYPE = "llava_onevision"
# Text models HFDecoder runs as they are (every released LLaVA-OneVision is Qwen2).
TEXT_MODEL_TYPES = ("qwen2",)
# SigLIP as LLaVA-OneVision reads it: a hidden state of the encoder, before the post-LayerNorm.
SIGLIP_HIDDEN_LAYOUT = ViTLayout(class_token=False, patch_bias=True, pre_norm=False, final_norm=False)
_ASPECT = re.compile(r"^anyres_max_(\d+)$")

# Checkpoint keys in the wild: transformers < 4.52 and 5.x write ``language_model.model.*``,
# ``language_model.lm_head.*``, ``image_newline`` and ``vision_tower.vision_model.*`` (5.x: ``vision_tower.*``);
# 4.52-4.57 write ``model.language_model.*``, ``lm_head.*``, ``model.image_newline`` and
# ``model.vision_tower.vision_model.*``. Order matters: lm_head before the rest of the language model.
_KEY_GROUPS = (
    ("vision", re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$")),
    ("projector", re.compile(r"^(?:model\.)?multi_modal_projector\.(.+)$")),
    ("newline", re.compile(r"^(?:model\.)?(image_newline)$")),
    ("lm_head", re.compile(r"^(?:language_model\.)?(lm_head\..+)$")),
    ("language", re.compile(r"^(?:model\.)?language_model\.(?:model\.)?(.+)$")),
)
# Vision tensors that never reach the logits: the post-LayerNorm (HF reads a hidden state), SigLIP's pooling head
# (built when vision_use_head is set), and buffers older transformers saved. Later layers are checked by number.
_UNUSED_VISION = re.compile(r"^(post_layernorm\..+|head\..+|embeddings\.position_ids)$")
_LATER_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
_UNUSED_LANGUAGE = re.compile(r"^.*rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------------------------
# Configs


def _side(value: Any, name: str, problems: list[str]) -> int | None:
    """A square size from an int or an ``(h, w)`` pair."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"vision_config.{name}={value!r} (expected one positive int: square images and patches)")
        return None
    return value


def max_tiles_from_hf(vision_aspect_ratio: Any) -> int:
    """``"anyres_max_9"`` -> 9, or a ``ValueError``."""
    m = _ASPECT.match(vision_aspect_ratio) if isinstance(vision_aspect_ratio, str) else None
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"vision_aspect_ratio={vision_aspect_ratio!r} (expected 'anyres_max_N', N >= 1)")
    return int(m.group(1))


def mmgpt_config_from_llava_onevision(
    hf_config, image_processor: dict[str, Any] | None = None, processor: dict[str, Any] | None = None,
    backend: str | None = None,
) -> MMGPTConfig:
    """The ``MMGPTConfig`` of a LLaVA-OneVision model (``vision.anyres`` set), or a ``ValueError`` naming every field
    that does not fit.

    Args:
        hf_config: a ``transformers.LlavaOnevisionConfig`` (SigLIP tower, Qwen2 text model).
        image_processor: the saved ``LlavaOnevisionImageProcessor`` config (its JSON as a dict). None: the model's
            grid pinpoints with mean = std = 0.5 and bicubic resizing, what the released models ship.
        processor: the saved ``LlavaOnevisionProcessor`` config (``num_image_tokens``,
            ``vision_feature_select_strategy``, ``vision_aspect_ratio``), checked against the model's.
        backend: whose resize the processor equals, ``"torchvision"`` or ``"pil"`` (``AnyresImageProcessor``).

    Returns:
        A config whose ``MMGPT`` computes the same logits once ``import_llava_onevision`` has copied the weights, and
        whose ``model.processor`` makes HF's pixels.
    """
    vc, tc = hf_config.vision_config, hf_config.text_config
    problems: list[str] = []
    if vc.model_type != "siglip_vision_model":
        problems.append(f"vision_config.model_type={vc.model_type!r} (expected 'siglip_vision_model')")
    if tc.model_type not in TEXT_MODEL_TYPES:
        problems.append(f"text_config.model_type={tc.model_type!r} (expected one of {list(TEXT_MODEL_TYPES)})")
    if problems:  # the fields below are only meaningful for SigLIP and Qwen2
        raise ValueError("the LLaVA-OneVision model does not fit mmgpt: " + "; ".join(problems))
    image_size = _side(vc.image_size, "image_size", problems)
    patch_size = _side(vc.patch_size, "patch_size", problems)
    if vc.num_channels != 3:
        problems.append(f"vision_config.num_channels={vc.num_channels} (expected 3)")
    if vc.hidden_act not in HF_ACT_TO_TIMM:
        problems.append(f"vision_config.hidden_act={vc.hidden_act!r} (expected one of {sorted(HF_ACT_TO_TIMM)})")
    if vc.layer_norm_eps != TIMM_SIGLIP_LN_EPS:
        problems.append(
            f"vision_config.layer_norm_eps={vc.layer_norm_eps} (expected {TIMM_SIGLIP_LN_EPS}, as timm's SigLIP)"
        )
    if vc.hidden_size % vc.num_attention_heads:
        problems.append(
            f"vision_config.hidden_size={vc.hidden_size} is not a multiple of num_attention_heads="
            f"{vc.num_attention_heads}"
        )
    mlp_ratio = timm_mlp_ratio(vc.hidden_size, vc.intermediate_size)
    if mlp_ratio is None:
        problems.append(f"vision_config.intermediate_size={vc.intermediate_size} is not reachable as a timm mlp_ratio")
    grid = None
    if image_size and patch_size:
        if image_size % patch_size:
            problems.append(f"vision_config.image_size={image_size} is not a multiple of patch_size={patch_size}")
        else:
            grid = image_size // patch_size
    if hf_config.vision_feature_select_strategy != "full":
        problems.append(
            f"vision_feature_select_strategy={hf_config.vision_feature_select_strategy!r} (expected 'full': SigLIP "
            f"has no CLS token to drop)"
        )
    feature_layer = None
    try:
        feature_layer = _feature_layer_from_hf(hf_config.vision_feature_layer, vc.num_hidden_layers)
    except ValueError as e:
        problems.append(str(e))
    if hf_config.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act={hf_config.projector_hidden_act!r} (expected 'gelu')")
    max_tiles = None
    try:
        max_tiles = max_tiles_from_hf(hf_config.vision_aspect_ratio)
    except ValueError as e:
        problems.append(str(e))
    pinpoints = [list(p) for p in hf_config.image_grid_pinpoints or ()]
    image_token_id = getattr(hf_config, "image_token_id", None)
    if image_token_id is None or not 0 <= image_token_id < tc.vocab_size:
        problems.append(
            f"image_token_index={image_token_id} is outside the text model's vocabulary "
            f"(text_config.vocab_size={tc.vocab_size})"
        )

    anyres_processor = None
    if image_processor is not None:
        try:
            anyres_processor = AnyresImageProcessor.from_hf(image_processor, "the saved image processor", backend)
        except ValueError as e:
            problems.append(str(e))
    elif image_size:
        try:
            anyres_processor = AnyresImageProcessor(
                tile_size=image_size, grid_pinpoints=pinpoints, mean=(0.5,) * 3, std=(0.5,) * 3, backend=backend
            )
        except ValueError as e:
            problems.append(f"image_grid_pinpoints: {e}")
    if anyres_processor is not None and image_size:
        if anyres_processor.tile_size != image_size:
            problems.append(
                f"the image processor's size is {anyres_processor.tile_size} px, but the vision tower takes "
                f"{image_size} px images (vision_config.image_size)"
            )
        if anyres_processor.grid_pinpoints != pinpoints:
            problems.append(
                f"the image processor's image_grid_pinpoints {anyres_processor.grid_pinpoints} differ from the "
                f"model's {pinpoints} (the model unpads by its own)"
            )
    if processor:
        n = processor.get("num_image_tokens")
        if grid and n is not None and n != grid * grid:
            problems.append(f"the processor's num_image_tokens={n}, but a tile makes {grid}x{grid} = {grid * grid}")
        strategy = processor.get("vision_feature_select_strategy")
        if strategy not in (None, "full"):
            problems.append(
                f"the processor's vision_feature_select_strategy={strategy!r} (expected 'full': it would count one "
                f"token fewer than the model makes)"
            )
        ratio = processor.get("vision_aspect_ratio", "anyres_max_9")
        if ratio != hf_config.vision_aspect_ratio:
            problems.append(
                f"the processor's vision_aspect_ratio={ratio!r} differs from the model's "
                f"{hf_config.vision_aspect_ratio!r}"
            )
    if problems:
        raise ValueError("the LLaVA-OneVision model does not fit mmgpt: " + "; ".join(problems))

    vision = VisionConfig(
        name=TIMM_SIGLIP,
        img_size=image_size,
        patch_size=patch_size,
        overrides=dict(
            embed_dim=vc.hidden_size, depth=vc.num_hidden_layers, num_heads=vc.num_attention_heads,
            mlp_ratio=mlp_ratio, act_layer=HF_ACT_TO_TIMM[vc.hidden_act],
        ),
        feature_layer=feature_layer,
        final_norm=False,  # a hidden state, before post_layernorm
        anyres=AnyresConfig(
            **{k: v for k, v in anyres_processor.to_dict().items() if k not in ("tile_size", "backend")},
            max_tiles=max_tiles,
            # The backend only as asked for: None follows whatever environment the model is loaded in.
            backend=backend,
        ),
    )
    text = tc.to_dict()
    # The top-level flag decides (transformers ties lm_head to the text embeddings by it alone).
    text["tie_word_embeddings"] = bool(hf_config.tie_word_embeddings)
    # transformers builds a model in its config's dtype: the saved one (bfloat16 for the released checkpoints)
    # would make the decoder alone bfloat16. mmgpt models are float32 until cast (import_llava_onevision's dtype).
    text["dtype"] = None
    decoder = DecoderConfig(
        vocab_size=tc.vocab_size, backend="hf", hf_config=text, tie_embeddings=bool(hf_config.tie_word_embeddings)
    )
    return MMGPTConfig(
        vision=vision,
        projector=ProjectorConfig(
            pixel_shuffle=1, mlp_depth=2, hidden_dim=tc.hidden_size, bias=bool(hf_config.multimodal_projector_bias),
            input_norm=False,
        ),
        decoder=decoder,
        image_token_id=image_token_id,
    )


def read_llava_onevision_config(hf_dir: str | Path):
    """Read ``config.json`` of a saved LLaVA-OneVision model (local only, nothing is downloaded).

    Returns:
        A ``transformers.LlavaOnevisionConfig``.
    """
    from transformers import LlavaOnevisionConfig

    file = Path(hf_dir) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a saved HF model: config.json is missing")
    model_type = json.loads(file.read_text()).get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(f"{file}: model_type={model_type!r}, expected {MODEL_TYPE!r} ({ARCHITECTURES[0]})")
    return LlavaOnevisionConfig.from_pretrained(str(hf_dir), local_files_only=True)


def is_llava_onevision_dir(path: str | Path) -> bool:
    """Whether ``path`` is a saved LLaVA-OneVision model (its ``config.json`` names one; nothing else is read)."""
    return names_model(path, (MODEL_TYPE,), ARCHITECTURES)


# ---------------------------------------------------------------------------------------------------------
# Weights


def _split_tensors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Sort a checkpoint's tensors into vision / projector / newline / language (``Qwen2ForCausalLM`` keys)."""
    groups: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "newline": {}, "language": {}}
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
        raise ValueError(f"{where}: tensors that are not part of a LLaVA-OneVision model: {sorted(unknown)[:10]}")
    return groups


def llava_onevision_state_dict(
    tensors: dict[str, torch.Tensor], config: MMGPTConfig, expected: dict[str, torch.Tensor], n_blocks: int,
    where: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """A LLaVA-OneVision checkpoint's tensors -> the ``MMGPT`` state dict of ``config`` (``vision.anyres``).

    Args:
        tensors: every tensor of the checkpoint, under its saved keys.
        config: the model's config (``mmgpt_config_from_llava_onevision``).
        expected: the state dict of an ``MMGPT`` of that config (its keys and shapes are what must be filled).
        n_blocks: the vision blocks the model keeps (up to the feature layer).
        where: how errors name the checkpoint.

    Raises:
        ValueError: a tensor the config implies is missing, one it has no place for, or one of another shape
            (naming them).
    """
    groups = _split_tensors(tensors, where)
    vision, projector, language = groups["vision"], dict(groups["projector"]), dict(groups["language"])
    newline = dict(groups["newline"])
    try:
        state, left = vit_from_hf(vision, n_blocks, SIGLIP_HIDDEN_LAYOUT)
        state = {"vision.model." + k: v for k, v in state.items()}
        names = ("weight", "bias") if config.projector.bias else ("weight",)
        for x in names:
            state[f"projector.mlp.0.{x}"] = projector.pop(f"linear_1.{x}")
            state[f"projector.mlp.2.{x}"] = projector.pop(f"linear_2.{x}")
        state["packer.image_newline"] = newline.pop("image_newline")
    except KeyError as e:
        raise ValueError(f"{where}: the checkpoint has no tensor {e.args[0]!r}, which the config implies") from e
    if config.decoder.tie_embeddings:
        # Tied: the head is the embedding matrix, whether or not the checkpoint also saved it under lm_head.
        head = language.pop("lm_head.weight", None)
        embed = language.get("model.embed_tokens.weight")
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise ValueError(f"{where}: tie_word_embeddings is true, but lm_head.weight differs from embed_tokens")
        if embed is not None:
            language["lm_head.weight"] = embed
    language = {k: v for k, v in language.items() if not _UNUSED_LANGUAGE.match(k)}
    state.update({"decoder.model." + k: v for k, v in language.items()})

    extra = [
        f"vision_tower.{k}" for k in left
        if not _UNUSED_VISION.match(k) and not ((m := _LATER_LAYER.match(k)) and int(m.group(1)) >= n_blocks)
    ]
    extra += [f"multi_modal_projector.{k}" for k in projector]
    extra += [_hf_name(k) for k in state if k not in expected]
    missing = [_hf_name(k) for k in expected if k not in state]
    wrong = [f"{_hf_name(k)} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing:
        raise ValueError(f"{where}: the checkpoint lacks tensors the config implies: {sorted(missing)[:10]}")
    if extra:
        raise ValueError(f"{where}: tensors the config has no place for: {sorted(extra)[:10]}")
    if wrong:
        raise ValueError(f"{where}: tensors of another shape than the config implies: {sorted(wrong)[:10]}")
    return state


def _hf_name(key: str) -> str:
    """An ``MMGPT`` state-dict key as errors name it: the language model's tensors by their
    ``Qwen2ForCausalLM`` keys (those the checkpoint's are mapped to)."""
    prefix = "decoder.model."
    return f"language_model {key[len(prefix):]}" if key.startswith(prefix) else key


def import_llava_onevision(
    hf_dir: str | Path, dtype: torch.dtype | None = None, backend: str | None = None
) -> MMGPT:
    """Load a saved HF ``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2) as an ``MMGPT`` (with
    ``vision.anyres``) with the same logits. ``mmgpt.load(hf_dir)`` calls this and adds the tokenizer.

    Feed it ``model.processor(picture)`` for each picture (``split=False`` for each of several in one prompt), a
    prompt with ``model.num_image_tokens(image)`` ``<image>`` placeholders per picture, and the pictures as
    ``images=[...]`` or ``image_embeds=model.encode_images([...])``.

    Args:
        hf_dir: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index), and the processor
            saved beside it (``processor_config.json`` or ``preprocessor_config.json``; without one, the released
            models' preprocessing with a warning).
        dtype: cast the weights to this dtype (default: float32, as every freshly built mmgpt model).
        backend: whose resize the processor equals (``AnyresImageProcessor.backend``; default transformers').

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: the config or the saved processor does not fit mmgpt (naming every field), or the checkpoint
            lacks a tensor the config implies or holds one it has no place for.
    """
    hf_dir = Path(hf_dir)
    hf_config = read_llava_onevision_config(hf_dir)
    image_processor, processor = _saved_processor(hf_dir)
    if image_processor is None:
        warnings.warn(
            f"{hf_dir}: no image processor config (processor_config.json or preprocessor_config.json); processing "
            f"pictures as the released models do (mean = std = 0.5, bicubic); save the model's processor beside it "
            f"to be sure",
            stacklevel=2,
        )
    config = mmgpt_config_from_llava_onevision(hf_config, image_processor, processor, backend)
    model = MMGPT(config)
    n_blocks = len(model.vision.model.blocks)  # VisionTower pruned the blocks after the feature layer
    state = llava_onevision_state_dict(_read_safetensors(hf_dir), config, model.state_dict(), n_blocks, str(hf_dir))
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_llava_onevision_tokenizer(hf_dir: str | Path, image_token_id: int | None = None):
    """The tokenizer saved with a LLaVA-OneVision model, with its processor's chat template, ready for generation
    (left padding; eos as pad when it has none).

    Raises:
        ValueError: the tokenizer's ``<image>`` is not the model's image token.
    """
    return load_vlm_tokenizer(
        hf_dir, image_token_id, "image_token_index", chat_template=_saved_chat_template(Path(hf_dir))
    )


# ---------------------------------------------------------------------------------------------------------
# Export

# transformers' name for the video placeholder; a tokenizer without it gets the config's default id (never in a
# prompt mmgpt writes, since mmgpt reads no videos).
VIDEO = "<video>"


def _export_problems(model: MMGPT) -> list[str]:
    """What in ``model`` a LLaVA-OneVision model cannot express (empty: it can)."""
    vision, projector, decoder = model.config.vision, model.config.projector, model.config.decoder
    problems = []
    if vision.name != TIMM_SIGLIP:
        problems.append(f"vision.name={vision.name!r} (expected {TIMM_SIGLIP!r}, the SigLIP tower)")
    if vision.final_norm:
        problems.append(
            "vision.final_norm=true (expected false: LLaVA-OneVision reads a hidden state, before the post-LayerNorm)"
        )
    if vision.anyres is None:
        problems.append("vision.anyres is not set (LLaVA-OneVision lays pictures out on tiles: expected its fields)")
    n_embd = decoder.n_embd if decoder.hf_config is None else decoder.hf_config.get("hidden_size")
    if (projector.pixel_shuffle != 1 or projector.mlp_depth != 2 or projector.hidden_dim not in (None, n_embd)
            or projector.input_norm or projector.pos_embed or projector.whiten):
        problems.append(
            "projector: expected LLaVA's Linear-GELU-Linear at the LM's width and nothing else (pixel_shuffle=1, "
            f"mlp_depth=2, hidden_dim={n_embd}; input_norm, pos_embed and whiten false), got pixel_shuffle="
            f"{projector.pixel_shuffle}, mlp_depth={projector.mlp_depth}, hidden_dim={projector.hidden_dim}, "
            f"input_norm={projector.input_norm}, pos_embed={projector.pos_embed}, whiten={projector.whiten}"
        )
    text_type = (decoder.hf_config or {}).get("model_type")
    if decoder.backend != "hf" or text_type not in TEXT_MODEL_TYPES:
        problems.append(
            f"decoder.backend={decoder.backend!r} with hf_config.model_type={text_type!r} (expected 'hf' and one of "
            f"{list(TEXT_MODEL_TYPES)}: transformers' Qwen2)"
        )
    if decoder.attention != "causal" or decoder.position_offset != 0:
        problems.append(
            f"decoder.attention={decoder.attention!r}, position_offset={decoder.position_offset} (expected 'causal' "
            f"and 0, as Qwen2)"
        )
    if not problems and timm_act_to_hf(model.vision.model.blocks[0].mlp.act) is None:
        problems.append(f"the vision MLP's activation {model.vision.model.blocks[0].mlp.act} has no HF name")
    return problems


def _check_exportable(model: MMGPT) -> None:
    problems = _export_problems(model)
    if problems:
        raise ValueError("this model does not fit LLaVA-OneVision's architecture: " + "; ".join(problems))


def llava_onevision_config_from_mmgpt(model: MMGPT, tokenizer=None):
    """The ``transformers.LlavaOnevisionConfig`` of an mmgpt model of this architecture.

    Args:
        model: an ``MMGPT`` as ``import_llava_onevision`` builds it (fine-tuned or not).
        tokenizer: its tokenizer; its ``<video>`` id becomes the config's video token (transformers' default
            without one).

    Raises:
        ValueError: naming every part of the model that LLaVA-OneVision's architecture cannot express.
    """
    from transformers import LlavaOnevisionConfig

    _check_exportable(model)
    vit, decoder, anyres = model.vision.model, model.config.decoder, model.config.vision.anyres
    block = vit.blocks[0]
    text = dict(decoder.hf_config)
    text.pop("dtype", None)  # import cleared it; the top-level dtype below says what was saved
    text["tie_word_embeddings"] = decoder.tie_embeddings
    vision_config = dict(
        model_type="siglip_vision_model", hidden_size=vit.embed_dim, intermediate_size=block.mlp.fc1.out_features,
        # The blocks the tower kept, up to the feature layer: read at the last one, they compute what it did.
        num_hidden_layers=len(vit.blocks), num_attention_heads=block.attn.num_heads, num_channels=3,
        image_size=model.config.vision.img_size, patch_size=vit.patch_embed.patch_size[0],
        hidden_act=timm_act_to_hf(block.mlp.act), layer_norm_eps=TIMM_SIGLIP_LN_EPS, vision_use_head=False,
    )
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    extra = {"video_token_index": vocab[VIDEO]} if VIDEO in vocab else {}
    config = LlavaOnevisionConfig(
        vision_config=vision_config, text_config=text, image_token_index=model.config.image_token_id,
        image_grid_pinpoints=[list(p) for p in anyres.grid_pinpoints],
        vision_aspect_ratio=f"anyres_max_{anyres.max_tiles}",
        vision_feature_select_strategy="full", vision_feature_layer=-1, projector_hidden_act="gelu",
        multimodal_projector_bias=model.config.projector.bias, tie_word_embeddings=decoder.tie_embeddings, **extra,
    )
    config.dtype = model.decoder.wte.weight.dtype  # from_pretrained(dtype="auto") then loads what was saved
    return config


def llava_onevision_hf_state_dict(model: MMGPT) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` under ``LlavaOnevisionForConditionalGeneration``'s keys
    (``model.{vision_tower,multi_modal_projector,language_model}.*``, ``model.image_newline`` and an untied
    ``lm_head``); the inverse of ``llava_onevision_state_dict``.

    Raises:
        ValueError: the model does not fit the architecture, or holds a tensor it has no place for.
    """
    _check_exportable(model)
    sd = model.state_dict()
    part = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
    vision, left = vit_to_hf(part("vision.model."), len(model.vision.model.blocks))
    if left:
        raise ValueError(f"the vision tower has tensors SigLIP has no place for: {sorted(left)}")
    # HF's tower always has a post-LayerNorm, which LLaVA-OneVision does not read (import dropped it): identity.
    width = vision["embeddings.patch_embedding.weight"].size(0)
    dtype = vision["embeddings.patch_embedding.weight"].dtype
    vision["post_layernorm.weight"] = torch.ones(width, dtype=dtype)
    vision["post_layernorm.bias"] = torch.zeros(width, dtype=dtype)
    out = {"model.vision_tower." + k: v for k, v in vision.items()}
    names = ("weight", "bias") if model.config.projector.bias else ("weight",)
    for x in names:
        out[f"model.multi_modal_projector.linear_1.{x}"] = sd[f"projector.mlp.0.{x}"]
        out[f"model.multi_modal_projector.linear_2.{x}"] = sd[f"projector.mlp.2.{x}"]
    out["model.image_newline"] = sd["packer.image_newline"]
    for k, v in part("decoder.model.").items():  # Qwen2ForCausalLM's keys: model.*, lm_head.weight
        if k == "lm_head.weight":
            if not model.config.decoder.tie_embeddings:  # tied, it is the embedding matrix, saved once
                out[k] = v
        elif k.startswith("model."):
            out["model.language_model." + k[len("model."):]] = v
        elif not _UNUSED_LANGUAGE.match(k):
            raise ValueError(f"the decoder has a tensor LLaVA-OneVision has no place for: decoder.model.{k}")
    # Cloned: the q/k/v pieces are views into timm's fused tensor, which safetensors refuses to save.
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _hf_processor(model: MMGPT, tokenizer):
    """The ``LlavaOnevisionProcessor`` that tiles pictures and counts their tokens as ``model.processor`` does, with
    ``tokenizer`` and its chat template."""
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    anyres = model.processor
    size = {"height": anyres.tile_size, "width": anyres.tile_size}
    resample = {name: code for code, name in RESAMPLE_NAMES.items()}[anyres.resample]
    image_cls = LlavaOnevisionImageProcessorPil if anyres.backend == "pil" else LlavaOnevisionImageProcessor
    image_processor = image_cls(
        size=size, image_grid_pinpoints=anyres.grid_pinpoints, image_mean=list(anyres.mean),
        image_std=list(anyres.std), rescale_factor=anyres.rescale_factor, resample=resample,
    )
    # mmgpt reads no videos; the processor class needs one, at the tower's size and normalization.
    video_processor = LlavaOnevisionVideoProcessor(
        size=size, image_mean=list(anyres.mean), image_std=list(anyres.std), resample=resample,
    )
    g = model.packer.layout.patch_grid
    return LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=g * g, vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{model.packer.layout.max_tiles}", chat_template=tokenizer.chat_template,
        image_token=IMAGE,
    )


def export_llava_onevision(model: MMGPT, tokenizer, out_dir: str | Path) -> None:
    """Write ``model`` as a HF directory that ``LlavaOnevisionForConditionalGeneration.from_pretrained`` (and
    ``AutoModelForImageTextToText``) loads with the same logits: ``config.json``, ``model.safetensors``, the tokenizer
    and a ``LlavaOnevisionProcessor`` (its chat template included) that makes the pixels and prompts mmgpt makes.
    ``import_llava_onevision`` (``mmgpt.load``) reads it back.

    Args:
        model: an ``MMGPT`` of LLaVA-OneVision's architecture (``import_llava_onevision``'s, possibly fine-tuned, with
            LoRA adapters merged).
        tokenizer: its tokenizer (``load_llava_onevision_tokenizer``'s, or the one a training checkpoint carries).
        out_dir: the directory to write (created if missing).

    Raises:
        ValueError: naming every part of the model LLaVA-OneVision's architecture cannot express, or a tokenizer
            whose ``<image>`` is not the model's image token.
    """
    config = llava_onevision_config_from_mmgpt(model, tokenizer)
    tensors = llava_onevision_hf_state_dict(model)
    check_finite(tensors, f"cannot export to {out_dir}")
    image_id = tokenizer.get_vocab().get(IMAGE)
    if image_id != model.config.image_token_id:
        raise ValueError(
            f"the tokenizer's {IMAGE} is id {image_id}, but the model's image token is {model.config.image_token_id}: "
            f"export the tokenizer the model was trained with"
        )
    processor = _hf_processor(model, copy.deepcopy(tokenizer))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(str(out_dir))  # the tokenizer's files and the chat template too


__all__ = [
    "import_llava_onevision", "load_llava_onevision_tokenizer", "mmgpt_config_from_llava_onevision",
    "read_llava_onevision_config", "llava_onevision_state_dict", "is_llava_onevision_dir", "max_tiles_from_hf",
    "export_llava_onevision", "llava_onevision_config_from_mmgpt", "llava_onevision_hf_state_dict",
    "ARCHITECTURES", "MODEL_TYPE",
]
