"""Import a HF Idefics3 or SmolVLM checkpoint (``Idefics3ForConditionalGeneration``,
``SmolVLMForConditionalGeneration``) into mmgpt's own modules.

Both are mmgpt's architecture with particular parts, so the conversion is a renaming of tensors:

    SigLIP vision tower  -> timm ``vit_base_patch16_siglip_gap_224`` with its sizes overridden, every layer, and
                            the post-LayerNorm (``vision.final_norm``): HF's ``last_hidden_state``
    connector            -> ``Projector``: pixel shuffle by ``scale_factor``, then one Linear without bias
                            (``mlp_depth=1``, ``bias=False``, ``input_norm=False``)
    Llama text model     -> the native decoder, through ``mmgpt.convert.hf_llama``

A user's picture is split into tiles plus a global view (``mmgpt.models.image_tiling``), each of which goes
through tower and connector on its own and yields ``image_seq_len`` tokens: one picture is ``K + 1`` mmgpt
images, spliced in order into the ``K + 1`` placeholder runs that ``image_tiling.image_prompt`` writes.

Details that decide whether the numbers match:

- HF's ``Idefics3Connector.pixel_shuffle`` and mmgpt's ``pixel_shuffle`` order the merged channels alike (the
  r x r neighbours row by row, each C wide): the Linear moves across unchanged.
- HF gives each patch the position ``bucketize(i / n, arange(1/n, 1, 1/n))`` (made for images of any size). For
  a full tile that is patch ``i`` itself for most grids (26, 27 and 32 patches a side: Idefics3-8B, SmolVLM2 and
  SmolVLM-256M), but float rounding shifts a few for others (19 or 25 a side); the timm position table is taken
  through the same bucketing, so it equals HF's either way.
- Tiles are always full (the processor pads none), so HF's ``pixel_attention_mask`` masks nothing and the timm
  tower, which has no mask, computes the same.

Only safetensors are read: a ``.bin`` checkpoint is a pickle that can run code. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from mmgpt.config import MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.hf_causal_lm import names_model
from mmgpt.convert.hf_llama import (
    check_hf_llama_config,
    from_hf_llama_config,
    from_hf_llama_state_dict,
    to_hf_llama_state_dict,
)
from mmgpt.convert.llava import _read_safetensors
from mmgpt.convert.vit_weights import HF_ACT_TO_TIMM, SIGLIP_LAYOUT, timm_mlp_ratio, vit_from_hf
from mmgpt.models.image_tiling import TilingImageProcessor
from mmgpt.models.mmgpt import MMGPT
from mmgpt.tokenizer import load_vlm_tokenizer

ARCHITECTURES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
MODEL_TYPES = ("idefics3", "smolvlm")
# The timm architecture every SigLIP tower is built from: no CLS token, patch bias, no pre-norm, a final
# LayerNorm(eps=1e-6), global average pooling (no attention-pool head to build and drop). The sizes come from the
# config as overrides, so "base/16/224" only picks the family (and timm's data config: mean = std = 0.5).
TIMM_SIGLIP = "vit_base_patch16_siglip_gap_224"
TIMM_SIGLIP_LN_EPS = 1e-6

# Checkpoint keys, transformers 4.x and 5.x alike: model.{vision_model,connector,text_model}.*, lm_head.*.
_KEY_GROUPS = (
    ("vision", re.compile(r"^(?:model\.)?vision_model\.(.+)$")),
    ("projector", re.compile(r"^(?:model\.)?connector\.(.+)$")),
    ("lm_head", re.compile(r"^(lm_head\..+)$")),
    ("language", re.compile(r"^(?:model\.)?text_model\.(.+)$")),
)
# Buffers older transformers saved; they hold nothing the model needs.
_UNUSED = re.compile(r"^(embeddings\.position_ids|.*rotary_emb\.inv_freq)$")


# ---------------------------------------------------------------------------------------------------------
# Configs


def _side(value: Any, name: str, problems: list[str]) -> int | None:
    """A square size from an int or an ``(h, w)`` pair (SmolVLM's vision config allows both)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"vision_config.{name}={value!r} (expected one positive int: square images and patches)")
        return None
    return value


def mmgpt_config_from_idefics3(
    hf_config, image_processor: dict[str, Any] | None = None, image_seq_len: int | None = None,
    backend: str | None = None,
) -> MMGPTConfig:
    """The ``MMGPTConfig`` of an Idefics3/SmolVLM model, or a ``ValueError`` naming every field that does not fit.

    Args:
        hf_config: a ``transformers.Idefics3Config`` or ``SmolVLMConfig`` (SigLIP tower, Llama text model).
        image_processor: the saved image processor's config (``Idefics3ImageProcessor``'s JSON as a dict), which
            becomes ``vision.tiling``. None: tiles of the tower's size and a longest edge of 4 tiles, what every
            released Idefics3 and SmolVLM ships (364/1456, 512/2048, 384/1536).
        image_seq_len: the saved processor's ``<image>`` tokens per tile, checked against the model's.
        backend: whose resize the tiling equals, ``"torchvision"`` or ``"pil"`` (``TilingImageProcessor``).

    Returns:
        A config whose ``MMGPT`` computes the same logits once ``import_idefics3`` has copied the weights, and
        whose ``model.processor`` cuts pictures as the HF processor does.
    """
    vc, tc = hf_config.vision_config, hf_config.text_config
    problems: list[str] = []
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
    r = hf_config.scale_factor
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"scale_factor={r!r} (expected a positive int)")
    elif image_size and patch_size:
        if image_size % patch_size:
            problems.append(f"vision_config.image_size={image_size} is not a multiple of patch_size={patch_size}")
        elif (image_size // patch_size) % r:
            problems.append(
                f"scale_factor={r} does not divide the {image_size // patch_size}x{image_size // patch_size} patch "
                f"grid (image_size={image_size}, patch_size={patch_size})"
            )
    if getattr(hf_config, "image_token_id", None) is None:
        problems.append("image_token_id is not set")
    tiling = None
    if image_processor is not None:
        try:
            tiling = TilingImageProcessor.from_hf(image_processor, backend=backend)
        except ValueError as e:
            problems.append(str(e))
    if tiling is not None and image_size and tiling.tile_size != image_size:
        problems.append(
            f"the image processor's max_image_size.longest_edge={tiling.tile_size}, but the vision tower takes "
            f"{image_size} px images (vision_config.image_size)"
        )
    if image_seq_len is not None and image_size and patch_size and isinstance(r, int) and r >= 1:
        expected = (image_size // patch_size) ** 2 // r**2
        if image_seq_len != expected:
            problems.append(f"the processor's image_seq_len={image_seq_len}, but the model makes {expected} per tile")
    try:
        check_hf_llama_config(tc, where="text_config")
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError(f"the {hf_config.model_type} model does not fit mmgpt: " + "; ".join(problems))
    if tiling is None:
        tiling = TilingImageProcessor(tile_size=image_size, longest_edge=4 * image_size, backend=backend)
    tiling_fields = {k: v for k, v in tiling.to_dict().items() if k not in ("tile_size", "backend")}
    vision = VisionConfig(
        name=TIMM_SIGLIP,
        img_size=image_size,
        patch_size=patch_size,
        overrides=dict(
            embed_dim=vc.hidden_size, depth=vc.num_hidden_layers, num_heads=vc.num_attention_heads,
            mlp_ratio=mlp_ratio, act_layer=HF_ACT_TO_TIMM[vc.hidden_act],
        ),
        # The connector reads HF's last_hidden_state: the last layer's output through post_layernorm.
        feature_layer=-1,
        final_norm=True,
        # The backend only as asked for: None follows whatever environment the model is loaded in.
        tiling={**tiling_fields, "backend": backend},
    )
    decoder = from_hf_llama_config(tc)
    # The top-level flag decides (transformers ties lm_head to the text embeddings by it alone).
    decoder.tie_embeddings = bool(hf_config.tie_word_embeddings)
    return MMGPTConfig(
        vision=vision,
        projector=ProjectorConfig(pixel_shuffle=r, mlp_depth=1, bias=False, input_norm=False),
        decoder=decoder,
        image_token_id=hf_config.image_token_id,
    )


def read_idefics3_config(hf_dir: str | Path):
    """Read ``config.json`` of a saved Idefics3/SmolVLM model (local only, nothing is downloaded).

    Args:
        hf_dir: the directory ``save_pretrained`` wrote.

    Returns:
        A ``transformers.Idefics3Config`` or ``SmolVLMConfig``.
    """
    from transformers import AutoConfig

    file = Path(hf_dir) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a saved HF model: config.json is missing")
    model_type = json.loads(file.read_text()).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{file}: model_type={model_type!r}, expected one of {list(MODEL_TYPES)} ({', '.join(ARCHITECTURES)})"
        )
    return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)


def is_idefics3_dir(path: str | Path) -> bool:
    """Whether ``path`` is a saved Idefics3/SmolVLM model (its ``config.json`` names one; nothing else is read)."""
    return names_model(path, MODEL_TYPES, ARCHITECTURES)


# ---------------------------------------------------------------------------------------------------------
# Weights


def vision_position_ids(grid: int) -> torch.Tensor:
    """``(grid * grid,)``: the row of HF's position table each patch of a full tile reads.

    ``Idefics3VisionEmbeddings`` buckets fractional coordinates (made for images of any size); this is its
    computation for a full ``grid x grid`` tile, step for step in float32, so it rounds as HF does.
    """
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    step = 1.0 / torch.tensor([grid])  # HF divides by the count of unmasked patch rows, an int64 tensor
    fractions = (torch.arange(grid, dtype=torch.float32)[None, :] * step[:, None]).clamp(max=1.0 - 1e-6)
    bucket = torch.bucketize(fractions, boundaries, right=True)[0]  # (grid,)
    return (bucket[:, None] * grid + bucket[None, :]).flatten()


def _split_tensors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Sort a checkpoint's tensors into vision / projector / language (``LlamaForCausalLM`` keys)."""
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
        raise ValueError(f"{where}: tensors that are not part of an Idefics3/SmolVLM model: {sorted(unknown)[:10]}")
    return groups


def idefics3_state_dict(
    tensors: dict[str, torch.Tensor], config: MMGPTConfig, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """An Idefics3/SmolVLM checkpoint's tensors -> the ``MMGPT`` state dict of ``config``
    (``mmgpt_config_from_idefics3``).

    Raises:
        ValueError: a tensor the config implies is missing, or one it has no place for (naming them).
    """
    groups = _split_tensors(tensors, where)
    vision, projector, language = groups["vision"], dict(groups["projector"]), groups["language"]
    grid = config.vision.img_size // config.vision.patch_size
    try:
        state, left = vit_from_hf(vision, config.vision.overrides["depth"], SIGLIP_LAYOUT, vision_position_ids(grid))
        state = {"vision.model." + k: v for k, v in state.items()}
        state["projector.mlp.0.weight"] = projector.pop("modality_projection.proj.weight")
        decoder = from_hf_llama_state_dict(language, config.decoder)
    except KeyError as e:
        raise ValueError(f"{where}: the checkpoint has no tensor {e.args[0]!r}, which the config implies") from e
    state.update({"decoder." + k: v for k, v in decoder.items()})
    used = set(to_hf_llama_state_dict(decoder, config.decoder)) | {"lm_head.weight"}  # a tied head may be saved
    extra = [f"vision_model.{k}" for k in left if not _UNUSED.match(k)]
    extra += [f"connector.{k}" for k in projector]
    extra += [f"text_model {k}" for k in language if k not in used and not _UNUSED.match(k)]
    if extra:
        raise ValueError(f"{where}: tensors the config has no place for: {sorted(extra)[:10]}")
    return state


def import_idefics3(hf_dir: str | Path, dtype: torch.dtype | None = None, backend: str | None = None) -> MMGPT:
    """Load a saved HF Idefics3/SmolVLM model (SigLIP + Llama) as an ``MMGPT`` with the same logits.

    ``model.processor`` is the saved processor's tiling (``image_tiling.TilingImageProcessor``): feed the model
    what it makes of a picture (tiles and global view, ``(K + 1, 3, S, S)``), and a prompt where the picture's
    ``<image>`` became ``image_tiling.image_prompt(rows, cols, model.image_seq_len)``.

    Args:
        hf_dir: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index), and the
            processor saved beside it (``processor_config.json`` or ``preprocessor_config.json``; without one
            the tiling is the released models' 4 tiles a side, with a warning).
        dtype: cast the weights to this dtype (default: float32, as every freshly built mmgpt model).
        backend: whose resize the tiling equals (``TilingImageProcessor.backend``; default transformers' choice).

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: the config or the saved processor does not fit mmgpt (naming every field), or the checkpoint
            lacks a tensor the config implies or holds one it has no place for.
    """
    hf_dir = Path(hf_dir)
    hf_config = read_idefics3_config(hf_dir)
    image_processor, processor = _saved_processor(hf_dir)
    if image_processor is None:
        warnings.warn(
            f"{hf_dir}: no image processor config (processor_config.json or preprocessor_config.json); tiling "
            f"pictures as the released models do (4 tiles a side); save the model's processor beside it to be sure",
            stacklevel=2,
        )
    config = mmgpt_config_from_idefics3(hf_config, image_processor, processor.get("image_seq_len"), backend)
    state = idefics3_state_dict(_read_safetensors(hf_dir), config, str(hf_dir))
    model = MMGPT(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{hf_dir}: the checkpoint does not fit its config: missing {missing[:10]}, unexpected "
            f"{unexpected[:10]}, of another shape {wrong[:10]}"
        )
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Preprocessing


def _saved_processor(hf_dir: Path) -> tuple[dict | None, dict]:
    """``(image processor config, processor config)`` saved next to the model: transformers 5 writes both into
    ``processor_config.json``, earlier versions the first into ``preprocessor_config.json``."""
    joint_file, single_file = hf_dir / "processor_config.json", hf_dir / "preprocessor_config.json"
    joint = json.loads(joint_file.read_text()) if joint_file.is_file() else {}
    image = joint.get("image_processor")
    if image is None and single_file.is_file():
        image = json.loads(single_file.read_text())
    return image, joint


def _saved_chat_template(hf_dir: Path) -> str | None:
    """The processor's chat template (transformers 5 writes ``chat_template.jinja``, 4.4x ``chat_template.json``,
    some versions put it into ``processor_config.json``); ``None`` if only the tokenizer has one, or none does."""
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        if (hf_dir / name).is_file():
            template = json.loads((hf_dir / name).read_text()).get("chat_template")
            if template:
                return template
    return None


def load_idefics3_tokenizer(hf_dir: str | Path, image_token_id: int | None = None):
    """The tokenizer saved with an Idefics3/SmolVLM model, with its processor's chat template, ready for
    generation (left padding; eos as pad when it has none).

    The processor's template (SmolVLM's) reads each message's content as HF's list of parts
    (``[{"type": "image"}, {"type": "text", "text": ...}]``) and writes ``<image>`` where an image part is.

    Args:
        hf_dir: the model's directory (``tokenizer.json`` and the processor's files).
        image_token_id: the model's ``image_token_id``, checked against the tokenizer's ``<image>``.

    Raises:
        ValueError: the tokenizer's ``<image>`` is not the model's image token.
    """
    return load_vlm_tokenizer(hf_dir, image_token_id, chat_template=_saved_chat_template(Path(hf_dir)))


__all__ = [
    "import_idefics3", "load_idefics3_tokenizer", "mmgpt_config_from_idefics3", "read_idefics3_config",
    "idefics3_state_dict", "vision_position_ids", "is_idefics3_dir", "ARCHITECTURES", "MODEL_TYPES",
]
