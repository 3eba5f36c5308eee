"""Import a HF PaliGemma checkpoint (``PaliGemmaForConditionalGeneration``) into mmgpt's own modules.

PaliGemma is mmgpt's architecture with particular parts, so the conversion is a renaming of tensors:

    SigLIP vision tower  -> timm ``vit_base_patch16_siglip_gap_224`` with its sizes overridden, every layer, and
                            the post-LayerNorm (``vision.final_norm``): HF's ``last_hidden_state``
    multi_modal_projector -> ``Projector``: one Linear with bias (``mlp_depth=1``, ``input_norm=False``)
    Gemma text model     -> transformers' own ``GemmaForCausalLM`` as the decoder (``decoder.backend="hf"``), with
                            prefix-LM attention (``decoder.attention="prefix"``)

A prompt is ``<image> x image_seq_len`` (one run per image), then ``<bos>``, the text and a newline
(``paligemma_prompt``), the string ``PaliGemmaProcessor`` writes. PaliGemma has no chat template;
``load_paligemma_tokenizer`` gives its tokenizer one (``PALIGEMMA_CHAT_TEMPLATE``) that writes this format, so the
Pipeline and the training Collator need nothing else.

Details that decide whether the numbers match:

- Gemma multiplies word embeddings by ``sqrt(hidden_size)`` inside its embedding module
  (``GemmaTextScaledWordEmbedding``), which is the decoder's ``wte``: the image tokens spliced after it reach the
  LM as the projector writes them, unscaled, as in transformers 5. (transformers 4 scaled every input embedding
  in ``GemmaModel.forward`` and so divided the image tokens by ``sqrt(hidden_size)`` first: the same numbers up to
  rounding.)
- Prefix-LM: HF lets the tokens whose ``token_type_ids`` are 0 (image, ``<bos>``, prompt and its newline) attend
  to each other both ways, and the suffix (the answer) causally. mmgpt's ``build_attention_mask`` with the prefix
  length is the same mask; at generation time the whole prompt is the prefix, in HF and in mmgpt alike.
- HF counts PaliGemma's positions from 1, mmgpt from 0: ``decoder.position_offset=1`` adds the 1, so the RoPE
  angles, and with SDPA on both sides the logits of training and of every generation step, are HF's bit for bit.
- HF's text config marks PaliGemma's Gemma ``use_bidirectional_attention``; mmgpt always passes its own masks, and
  the decoder's config switches the flag off so that a call without one is plainly causal.
- Images: ``SiglipImageProcessor`` squashes the picture to the tower's square size with bicubic resampling and
  normalizes with mean = std = 0.5, which is ``model.processor`` (timm's data config for SigLIP). It equals
  transformers' PIL backend bit for bit; the torchvision backend (transformers 5's default) resizes with its own
  bicubic, which differs by one or two levels of 255 in some pixels.

Not supported (named by ``mmgpt_config_from_paligemma``): PaliGemma 2's Gemma 2 text model (``HFDecoder`` builds its
LM with SDPA, which Gemma 2 refuses for its attention soft-capping), a vision tower other than SigLIP.

Export (``export_paligemma``) is the same renaming backwards: a model of this architecture, fine-tuned or not, is
written as a directory that ``PaliGemmaForConditionalGeneration`` loads with the same logits, with the tokenizer and
a ``PaliGemmaProcessor``.

Only safetensors are read: a ``.bin`` checkpoint is a pickle that can run code. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.hf_causal_lm import names_model
from mmgpt.convert.idefics3 import TIMM_SIGLIP, TIMM_SIGLIP_LN_EPS
from mmgpt.convert.llava import _read_safetensors
from mmgpt.convert.vit_weights import (
    HF_ACT_TO_TIMM,
    SIGLIP_LAYOUT,
    timm_act_to_hf,
    timm_mlp_ratio,
    vit_from_hf,
    vit_to_hf,
)
from mmgpt.finite_weights import check_finite
from mmgpt.models.mmgpt import MMGPT
from mmgpt.prompts import IMAGE
from mmgpt.tokenizer import load_vlm_tokenizer

ARCHITECTURES = ("PaliGemmaForConditionalGeneration",)
MODEL_TYPE = "paligemma"
# Text models HFDecoder runs as they are. Gemma 2 (PaliGemma 2) has no SDPA attention in transformers.
TEXT_MODEL_TYPES = ("gemma",)

# Checkpoint keys in the wild: transformers < 4.52 and 5.x write ``language_model.model.*``,
# ``language_model.lm_head.*`` (untied only) and ``vision_tower.vision_model.*`` (5.x: ``vision_tower.*``);
# 4.52-4.57 write ``model.language_model.*``, ``lm_head.*`` and ``model.vision_tower.vision_model.*``.
# Order matters: lm_head before the rest of the language model.
_KEY_GROUPS = (
    ("vision", re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$")),
    ("projector", re.compile(r"^(?:model\.)?multi_modal_projector\.(.+)$")),
    ("lm_head", re.compile(r"^(?:language_model\.)?(lm_head\..+)$")),
    ("language", re.compile(r"^(?:model\.)?language_model\.(?:model\.)?(.+)$")),
)
# Buffers older transformers saved; they hold nothing the model needs.
_UNUSED = re.compile(r"^(embeddings\.position_ids|.*rotary_emb\.inv_freq)$")
# SigLIP's attention-pooling head: built when vision_config.vision_use_head is true (the default of a bare
# SiglipVisionConfig), never on PaliGemma's path, which reads the tower's last_hidden_state.
_POOLING_HEAD = re.compile(r"^head\..+$")
# HF saves the resampling filter as PIL's number (named in errors).
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


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


def _image_processor_problems(d: dict[str, Any], image_size: int | None, image_seq_len: int | None) -> list[str]:
    """What in a saved ``SiglipImageProcessor`` config mmgpt's ``ImageProcessor`` for SigLIP does not do."""
    where = "the saved image processor's"
    problems = []
    kind = d.get("image_processor_type", "SiglipImageProcessor")
    if kind not in ("SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil"):
        problems.append(f"{where} image_processor_type={kind!r} (expected 'SiglipImageProcessor')")
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if d.get(flag, True) is not True:
            problems.append(f"{where} {flag}={d[flag]!r} (expected true)")
    size = d.get("size", {"height": 224, "width": 224})
    if not isinstance(size, dict) or (size.get("height"), size.get("width")) != (image_size, image_size):
        problems.append(f"{where} size={size!r}, but the vision tower takes {image_size} px squares")
    resample = d.get("resample", 3)
    if resample != 3:
        problems.append(
            f"{where} resample={resample!r} ({_PIL_FILTERS.get(resample, 'unknown')}; expected 3, bicubic, "
            f"timm's filter for SigLIP)"
        )
    if not math.isclose(d.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-9):
        problems.append(f"{where} rescale_factor={d['rescale_factor']!r} (expected 1/255)")
    for field in ("image_mean", "image_std"):
        value = d.get(field, [0.5] * 3)
        value = value if isinstance(value, (list, tuple)) else [value] * 3
        if [float(v) for v in value] != [0.5] * 3:
            problems.append(f"{where} {field}={value!r} (expected 0.5 for each channel, SigLIP's and timm's)")
    seq = d.get("image_seq_length")
    if seq is not None and image_seq_len is not None and seq != image_seq_len:
        problems.append(f"{where} image_seq_length={seq}, but the tower makes {image_seq_len} tokens per image")
    return problems


def mmgpt_config_from_paligemma(hf_config, image_processor: dict[str, Any] | None = None) -> MMGPTConfig:
    """The ``MMGPTConfig`` of a PaliGemma model, or a ``ValueError`` naming every field that does not fit.

    Args:
        hf_config: a ``transformers.PaliGemmaConfig`` (SigLIP tower, Gemma text model).
        image_processor: the saved image processor's config (``SiglipImageProcessor``'s JSON as a dict), checked
            against what ``model.processor`` does. None: not checked.

    Returns:
        A config whose ``MMGPT`` computes the same logits once ``import_paligemma`` has copied the weights: the
        decoder is transformers' Gemma built from the checkpoint's ``text_config``, with prefix-LM attention.
    """
    vc, tc = hf_config.vision_config, hf_config.text_config
    problems: list[str] = []
    if vc.model_type != "siglip_vision_model":
        problems.append(f"vision_config.model_type={vc.model_type!r} (expected 'siglip_vision_model')")
    if tc.model_type not in TEXT_MODEL_TYPES:
        reason = (
            " (PaliGemma 2: mmgpt's HF decoder runs its LM with SDPA attention, which transformers' Gemma 2 does "
            "not offer because of its attention soft-capping)" if tc.model_type == "gemma2" else ""
        )
        problems.append(f"text_config.model_type={tc.model_type!r}{reason}; expected one of {list(TEXT_MODEL_TYPES)}")
    if problems:  # the fields below are only meaningful for SigLIP and Gemma
        raise ValueError("the PaliGemma model does not fit mmgpt: " + "; ".join(problems))
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
    # timm sizes the MLP as int(embed_dim * mlp_ratio): the ratio must give back the exact width.
    mlp_ratio = timm_mlp_ratio(vc.hidden_size, vc.intermediate_size)
    if mlp_ratio is None:
        problems.append(f"vision_config.intermediate_size={vc.intermediate_size} is not reachable as a timm mlp_ratio")
    image_seq_len = None
    if image_size and patch_size:
        if image_size % patch_size:
            problems.append(f"vision_config.image_size={image_size} is not a multiple of patch_size={patch_size}")
        else:
            image_seq_len = (image_size // patch_size) ** 2
    # The projector writes into the LM's embedding space.
    if hf_config.projection_dim != tc.hidden_size:
        problems.append(
            f"projection_dim={hf_config.projection_dim} differs from text_config.hidden_size={tc.hidden_size} (the "
            f"projected image tokens are spliced among the word embeddings)"
        )
    image_token_id = getattr(hf_config, "image_token_id", None)
    if image_token_id is None:
        problems.append("image_token_index is not set")
    elif not 0 <= image_token_id < tc.vocab_size:
        # HF swaps such an id for 0 before the embedding lookup; mmgpt looks every id up in the word embeddings.
        problems.append(
            f"image_token_index={image_token_id} is outside the text model's vocabulary "
            f"(text_config.vocab_size={tc.vocab_size})"
        )
    if image_processor is not None:
        problems += _image_processor_problems(image_processor, image_size, image_seq_len)
    if problems:
        raise ValueError("the PaliGemma model does not fit mmgpt: " + "; ".join(problems))

    vision = VisionConfig(
        name=TIMM_SIGLIP,
        img_size=image_size,
        patch_size=patch_size,
        overrides=dict(
            embed_dim=vc.hidden_size, depth=vc.num_hidden_layers, num_heads=vc.num_attention_heads,
            mlp_ratio=mlp_ratio, act_layer=HF_ACT_TO_TIMM[vc.hidden_act],
        ),
        # The projector reads HF's last_hidden_state: the last layer's output through post_layernorm.
        feature_layer=-1,
        final_norm=True,
    )
    text = tc.to_dict()
    # The top-level flag decides (transformers ties lm_head to the text embeddings by it alone).
    text["tie_word_embeddings"] = bool(hf_config.tie_word_embeddings)
    # mmgpt hands the LM every mask itself (build_attention_mask, prefix-LM included); without one it is causal.
    text["use_bidirectional_attention"] = False
    # transformers builds a model in its config's dtype: the saved one (bfloat16 for the released checkpoints)
    # would make the decoder alone bfloat16. mmgpt models are float32 until cast (import_paligemma's dtype).
    text["dtype"] = None
    decoder = DecoderConfig(
        vocab_size=tc.vocab_size, attention="prefix", backend="hf", hf_config=text,
        tie_embeddings=bool(hf_config.tie_word_embeddings), position_offset=1,  # HF counts from 1
    )
    return MMGPTConfig(
        vision=vision,
        projector=ProjectorConfig(pixel_shuffle=1, mlp_depth=1, bias=True, input_norm=False),
        decoder=decoder,
        image_token_id=image_token_id,
    )


def read_paligemma_config(hf_dir: str | Path):
    """Read ``config.json`` of a saved PaliGemma model (local only, nothing is downloaded).

    Args:
        hf_dir: the directory ``save_pretrained`` wrote.

    Returns:
        A ``transformers.PaliGemmaConfig``.
    """
    from transformers import PaliGemmaConfig

    file = Path(hf_dir) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a saved HF model: config.json is missing")
    model_type = json.loads(file.read_text()).get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(f"{file}: model_type={model_type!r}, expected {MODEL_TYPE!r} ({ARCHITECTURES[0]})")
    return PaliGemmaConfig.from_pretrained(str(hf_dir), local_files_only=True)


def is_paligemma_dir(path: str | Path) -> bool:
    """Whether ``path`` is a saved PaliGemma model (its ``config.json`` names one; nothing else is read)."""
    return names_model(path, (MODEL_TYPE,), ARCHITECTURES)


# ---------------------------------------------------------------------------------------------------------
# Weights


def _split_tensors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Sort a checkpoint's tensors into vision / projector / language (``GemmaForCausalLM`` keys)."""
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
        raise ValueError(f"{where}: tensors that are not part of a PaliGemma model: {sorted(unknown)[:10]}")
    return groups


def paligemma_state_dict(
    tensors: dict[str, torch.Tensor], config: MMGPTConfig, expected: dict[str, torch.Tensor],
    vision_head: bool = False, where: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """A PaliGemma checkpoint's tensors -> the ``MMGPT`` state dict of ``config`` (``mmgpt_config_from_paligemma``).

    Args:
        tensors: every tensor of the checkpoint, under its saved keys.
        config: the model's config.
        expected: the state dict of an ``MMGPT(config)`` (its keys and shapes are what must be filled).
        vision_head: the checkpoint's vision config has ``vision_use_head``: SigLIP's pooling head is saved, and
            left out (it never reaches PaliGemma's logits).
        where: how errors name the checkpoint.

    Raises:
        ValueError: a tensor the config implies is missing, one it has no place for, or one of another shape
            (naming them).
    """
    groups = _split_tensors(tensors, where)
    vision, projector, language = groups["vision"], dict(groups["projector"]), dict(groups["language"])
    try:
        state, left = vit_from_hf(vision, config.vision.overrides["depth"], SIGLIP_LAYOUT)
        state = {"vision.model." + k: v for k, v in state.items()}
        state["projector.mlp.0.weight"] = projector.pop("linear.weight")
        state["projector.mlp.0.bias"] = projector.pop("linear.bias")
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
    language = {k: v for k, v in language.items() if not _UNUSED.match(k)}
    state.update({"decoder.model." + k: v for k, v in language.items()})

    extra = [f"vision_tower.{k}" for k in left if not _UNUSED.match(k) and not (vision_head and _POOLING_HEAD.match(k))]
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
    """An ``MMGPT`` state-dict key as errors name it: the language model's tensors by their ``GemmaForCausalLM``
    keys (those the checkpoint's are mapped to)."""
    prefix = "decoder.model."
    return f"language_model {key[len(prefix):]}" if key.startswith(prefix) else key


def import_paligemma(hf_dir: str | Path, dtype: torch.dtype | None = None) -> MMGPT:
    """Load a saved HF ``PaliGemmaForConditionalGeneration`` (SigLIP + Gemma) as an ``MMGPT`` with the same logits.

    Feed it ``paligemma_prompt`` ids and pixels from ``model.processor``; ``model.image_seq_len`` placeholders per
    image. Its decoder is a prefix-LM (``decoder.attention="prefix"``): in training give ``prefix_lengths`` (image
    + ``<bos>`` + prompt + newline), in generation the whole prompt is the prefix.

    Args:
        hf_dir: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index); the processor
            saved beside it (``processor_config.json`` or ``preprocessor_config.json``) is checked against
            ``model.processor`` when present.
        dtype: cast the weights to this dtype (default: float32, as every freshly built mmgpt model).

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: the config or the saved image processor does not fit mmgpt (naming every field), or the
            checkpoint lacks a tensor the config implies or holds one it has no place for.
    """
    hf_dir = Path(hf_dir)
    hf_config = read_paligemma_config(hf_dir)
    config = mmgpt_config_from_paligemma(hf_config, _saved_image_processor(hf_dir))
    model = MMGPT(config)
    expected = model.state_dict()
    vision_head = bool(getattr(hf_config.vision_config, "vision_use_head", False))
    state = paligemma_state_dict(_read_safetensors(hf_dir), config, expected, vision_head, str(hf_dir))
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Prompts


def _saved_image_processor(hf_dir: Path) -> dict | None:
    """The image processor config saved next to the model: transformers 5 writes it into
    ``processor_config.json``, earlier versions into ``preprocessor_config.json``."""
    joint, single = hf_dir / "processor_config.json", hf_dir / "preprocessor_config.json"
    if joint.is_file():
        image = json.loads(joint.read_text()).get("image_processor")
        if image is not None:
            return image
    return json.loads(single.read_text()) if single.is_file() else None


def paligemma_prompt(prompt: str, num_images: int, image_seq_len: int, bos_token: str) -> str:
    """The text ``PaliGemmaProcessor`` writes for a prompt: the images' placeholders first, then ``<bos>``, the
    prompt and a newline, which ends the prefix (tokenize it with ``add_special_tokens=False``).

    Args:
        prompt: the task prompt as PaliGemma was trained on it (``"caption en"``, ``"answer en <question>"``, ...).
        num_images: images before the text (PaliGemma's are trained with one).
        image_seq_len: placeholders per image (``model.image_seq_len``).
        bos_token: the tokenizer's ``bos_token``.
    """
    if IMAGE in prompt:
        raise ValueError(
            f"prompt {prompt!r:.80} holds {IMAGE!r}: the images' placeholders go before <bos>, and "
            f"paligemma_prompt writes them (num_images)"
        )
    return IMAGE * (num_images * image_seq_len) + bos_token + prompt + "\n"


# PaliGemma's prompt format as a chat template, so that mmgpt's own conversation path (``prompts.encode_conversation``
# in the Pipeline and the training Collator) writes what PaliGemmaProcessor writes: the user turn is the prefix
# (its images first, then <bos>, the prompt and a newline), the assistant turn the suffix (the answer and <eos>,
# as the processor appends to a suffix). There is no generation prompt: the newline ends the prefix. PaliGemma is no
# chat model: one user turn and at most one answer.
PALIGEMMA_CHAT_TEMPLATE = (
    "{%- if messages | length > 2 or (messages | length > 0 and messages[0]['role'] != 'user')"
    " or (messages | length > 1 and messages[1]['role'] != 'assistant') -%}"
    "{{ raise_exception('PaliGemma takes one user turn (the prompt, its images first) and at most one answer') }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<image>' * message['content'].count('<image>') + bos_token + message['content'].replace('<image>', '')"
    " + '\\n' }}"
    "{%- else -%}"
    "{{ message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def load_paligemma_tokenizer(hf_dir: str | Path, image_token_id: int | None = None):
    """The tokenizer saved with a PaliGemma model, ready for generation (left padding), with
    ``PALIGEMMA_CHAT_TEMPLATE`` as its chat template unless it has one of its own.

    With it, ``mmgpt.Pipeline`` and the training ``Collator`` render PaliGemma's prompts through mmgpt's usual
    conversation path; ``paligemma_prompt`` renders one directly (it writes ``<bos>`` itself: encode it with
    ``add_special_tokens=False``, as Gemma's tokenizer would otherwise put a second ``<bos>`` before the images).

    Args:
        hf_dir: the model's directory (``tokenizer.json``).
        image_token_id: the model's ``image_token_index``, checked against the tokenizer's ``<image>``.

    Raises:
        ValueError: the tokenizer's ``<image>`` is not the model's image token.
    """
    return load_vlm_tokenizer(hf_dir, image_token_id, "image_token_index", fallback_template=PALIGEMMA_CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------------------
# Export


def _export_problems(model: MMGPT) -> list[str]:
    """What in ``model`` a PaliGemma model cannot express (empty: it can)."""
    vision, projector, decoder = model.config.vision, model.config.projector, model.config.decoder
    problems = []
    if vision.name != TIMM_SIGLIP:
        problems.append(f"vision.name={vision.name!r} (expected {TIMM_SIGLIP!r}, the SigLIP tower)")
    if vision.feature_layer != -1 or not vision.final_norm:
        problems.append(
            f"vision.feature_layer={vision.feature_layer}, final_norm={vision.final_norm} (expected -1 and true: the "
            f"projector reads the last block through the post-LayerNorm)"
        )
    if vision.tiling is not None:
        problems.append("vision.tiling is set (PaliGemma takes each picture as one square image)")
    if (projector.pixel_shuffle != 1 or projector.mlp_depth != 1 or not projector.bias or projector.input_norm
            or projector.pos_embed or projector.whiten):
        problems.append(
            "projector: expected one Linear with bias and nothing else (pixel_shuffle=1, mlp_depth=1, bias=true; "
            f"input_norm, pos_embed and whiten false), got pixel_shuffle={projector.pixel_shuffle}, mlp_depth="
            f"{projector.mlp_depth}, bias={projector.bias}, input_norm={projector.input_norm}, pos_embed="
            f"{projector.pos_embed}, whiten={projector.whiten}"
        )
    text_type = (decoder.hf_config or {}).get("model_type")
    if decoder.backend != "hf" or text_type not in TEXT_MODEL_TYPES:
        problems.append(
            f"decoder.backend={decoder.backend!r} with hf_config.model_type={text_type!r} (expected 'hf' and one of "
            f"{list(TEXT_MODEL_TYPES)}: transformers' Gemma)"
        )
    if decoder.attention != "prefix" or decoder.position_offset != 1:
        problems.append(
            f"decoder.attention={decoder.attention!r}, position_offset={decoder.position_offset} (expected 'prefix' "
            f"and 1, PaliGemma's prefix-LM counting positions from 1)"
        )
    if not problems and timm_act_to_hf(model.vision.model.blocks[0].mlp.act) is None:
        problems.append(f"the vision MLP's activation {model.vision.model.blocks[0].mlp.act} has no HF name")
    return problems


def paligemma_config_from_mmgpt(model: MMGPT):
    """The ``transformers.PaliGemmaConfig`` of an mmgpt model of this architecture.

    Args:
        model: an ``MMGPT`` as ``import_paligemma`` builds it (fine-tuned or not).

    Raises:
        ValueError: naming every part of the model that PaliGemma's architecture cannot express.
    """
    from transformers import PaliGemmaConfig

    problems = _export_problems(model)
    if problems:
        raise ValueError("this model does not fit PaliGemma's architecture: " + "; ".join(problems))
    vit, decoder = model.vision.model, model.config.decoder
    block = vit.blocks[0]
    text = dict(decoder.hf_config)
    hidden = text["hidden_size"]
    # What import switched off for mmgpt's own masks; HF's PaliGemma reads the prefix from token_type_ids with it.
    text["use_bidirectional_attention"] = True
    text.pop("dtype", None)
    vision_config = dict(
        model_type="siglip_vision_model", hidden_size=vit.embed_dim, intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks), num_attention_heads=block.attn.num_heads, num_channels=3,
        image_size=model.config.vision.img_size, patch_size=vit.patch_embed.patch_size[0],
        hidden_act=timm_act_to_hf(block.mlp.act), layer_norm_eps=TIMM_SIGLIP_LN_EPS, vision_use_head=False,
        projection_dim=hidden,
    )
    config = PaliGemmaConfig(
        vision_config=vision_config, text_config=text, image_token_index=model.config.image_token_id,
        vocab_size=text["vocab_size"], projection_dim=hidden, hidden_size=hidden,
        tie_word_embeddings=decoder.tie_embeddings,
    )
    config.dtype = model.decoder.wte.weight.dtype  # from_pretrained(dtype="auto") then loads what was saved
    return config


def paligemma_hf_state_dict(model: MMGPT) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` under ``PaliGemmaForConditionalGeneration``'s checkpoint keys as transformers 5
    writes them (``model.{vision_tower,multi_modal_projector,language_model}.*`` and an untied ``lm_head``)."""
    problems = _export_problems(model)
    if problems:
        raise ValueError("this model does not fit PaliGemma's architecture: " + "; ".join(problems))
    sd = model.state_dict()
    part = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
    vision, left = vit_to_hf(part("vision.model."), len(model.vision.model.blocks))
    if left:
        raise ValueError(f"the vision tower has tensors SigLIP has no place for: {sorted(left)}")
    out = {"model.vision_tower." + k: v for k, v in vision.items()}
    out["model.multi_modal_projector.linear.weight"] = sd["projector.mlp.0.weight"]
    out["model.multi_modal_projector.linear.bias"] = sd["projector.mlp.0.bias"]
    for k, v in part("decoder.model.").items():  # GemmaForCausalLM's keys: model.*, lm_head.weight
        if k == "lm_head.weight":
            if not model.config.decoder.tie_embeddings:  # tied, it is the embedding matrix, saved once
                out[k] = v
        elif k.startswith("model."):
            out["model.language_model." + k[len("model."):]] = v
        elif not _UNUSED.match(k):
            raise ValueError(f"the decoder has a tensor PaliGemma has no place for: decoder.model.{k}")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export_paligemma(model: MMGPT, tokenizer, out_dir: str | Path) -> None:
    """Write ``model`` as a HF directory that ``PaliGemmaForConditionalGeneration.from_pretrained`` (and
    ``AutoModelForImageTextToText``) loads with the same logits: ``config.json``, ``model.safetensors``, the
    tokenizer and a ``PaliGemmaProcessor`` (SigLIP's image processor at the tower's size, ``image_seq_len`` image
    tokens). ``import_paligemma`` reads it back.

    The tokenizer is written without ``PALIGEMMA_CHAT_TEMPLATE`` (mmgpt's own rendering of PaliGemma's prompt
    format, added on import), as PaliGemma's own tokenizer has no chat template.

    Args:
        model: an ``MMGPT`` of PaliGemma's architecture (``import_paligemma``'s, possibly fine-tuned, with LoRA
            adapters merged).
        tokenizer: its tokenizer (``load_paligemma_tokenizer``'s, or the one a training checkpoint carries).
        out_dir: the directory to write (created if missing).

    Raises:
        ValueError: naming every part of the model PaliGemma's architecture cannot express.
    """
    from transformers import PaliGemmaProcessor, SiglipImageProcessor


    config = paligemma_config_from_mmgpt(model)
    tensors = paligemma_hf_state_dict(model)
    check_finite(tensors, f"cannot export to {out_dir}")
    tokenizer = copy.deepcopy(tokenizer)  # the processor adds PaliGemma's location tokens to the one it is given
    if tokenizer.chat_template == PALIGEMMA_CHAT_TEMPLATE:
        tokenizer.chat_template = None
    size = model.config.vision.img_size
    image_processor = SiglipImageProcessor(
        size={"height": size, "width": size}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        image_seq_length=model.image_seq_len,
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens with PaliGemma's location and segmentation tokens, more "
            f"than the model's vocabulary ({config.text_config.vocab_size}): export the tokenizer the model was "
            f"imported with"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(str(out_dir))  # the tokenizer's files too


__all__ = [
    "export_paligemma", "paligemma_config_from_mmgpt", "paligemma_hf_state_dict",
    "import_paligemma", "load_paligemma_tokenizer", "mmgpt_config_from_paligemma", "read_paligemma_config",
    "paligemma_state_dict", "paligemma_prompt", "is_paligemma_dir", "PALIGEMMA_CHAT_TEMPLATE", "ARCHITECTURES",
    "MODEL_TYPE",
]
