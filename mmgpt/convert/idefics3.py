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

Export (``export_idefics3``) is the same renaming backwards: a model of this architecture, fine-tuned or not, is
written as a directory that ``SmolVLMForConditionalGeneration`` (or ``Idefics3ForConditionalGeneration``) loads with
the same logits, with the tokenizer and an ``Idefics3Processor`` that tiles pictures as ``model.processor`` does.
Where position bucketing makes two patches read one row of HF's table, the timm rows must still be equal (they
are unless the tower was trained); HF's rows that no patch of a full tile reads are written as zeros.

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

from mmgpt.config import MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.hf_causal_lm import names_model
from mmgpt.convert.hf_llama import (
    check_hf_llama_config,
    from_hf_llama_config,
    from_hf_llama_state_dict,
    to_hf_llama_config,
    to_hf_llama_state_dict,
)
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


# ---------------------------------------------------------------------------------------------------------
# Export


def _export_problems(model: MMGPT) -> list[str]:
    """What in ``model`` an Idefics3/SmolVLM model cannot express (empty: it can)."""
    vision, projector, decoder = model.config.vision, model.config.projector, model.config.decoder
    problems = []
    if vision.name != TIMM_SIGLIP:
        problems.append(f"vision.name={vision.name!r} (expected {TIMM_SIGLIP!r}, the SigLIP tower)")
    if vision.feature_layer != -1 or not vision.final_norm:
        problems.append(
            f"vision.feature_layer={vision.feature_layer}, final_norm={vision.final_norm} (expected -1 and true: the "
            f"connector reads the last block through the post-LayerNorm)"
        )
    if vision.tiling is None:
        problems.append("vision.tiling is not set (the HF processor splits pictures into tiles: expected its fields)")
    if projector.mlp_depth != 1 or projector.bias or projector.input_norm or projector.pos_embed or projector.whiten:
        problems.append(
            "projector: expected one Linear without bias and nothing else (mlp_depth=1, bias, input_norm, pos_embed "
            f"and whiten false), got mlp_depth={projector.mlp_depth}, bias={projector.bias}, input_norm="
            f"{projector.input_norm}, pos_embed={projector.pos_embed}, whiten={projector.whiten}"
        )
    if decoder.backend != "native" or decoder.attention != "causal":
        problems.append(
            f"decoder.backend={decoder.backend!r}, attention={decoder.attention!r} (expected 'native' and 'causal': "
            f"a Llama text model)"
        )
    if not problems and timm_act_to_hf(model.vision.model.blocks[0].mlp.act) is None:
        problems.append(f"the vision MLP's activation {model.vision.model.blocks[0].mlp.act} has no HF name")
    return problems


def idefics3_config_from_mmgpt(model: MMGPT, model_type: str = "smolvlm", tokenizer=None):
    """The ``transformers.SmolVLMConfig`` (or ``Idefics3Config``) of an mmgpt model of this architecture.

    Args:
        model: an ``MMGPT`` as ``import_idefics3`` builds it (fine-tuned or not).
        model_type: ``"smolvlm"`` or ``"idefics3"``: which HF class the directory is for (the same computation).
        tokenizer: its tokenizer, whose pad/bos/eos ids go into the text config (HF's ``generate`` reads them).

    Raises:
        ValueError: naming every part of the model that the architecture cannot express.
    """
    from transformers import Idefics3Config, SmolVLMConfig

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}; expected one of {list(MODEL_TYPES)}")
    problems = _export_problems(model)
    if problems:
        raise ValueError(f"this model does not fit {model_type}'s architecture: " + "; ".join(problems))
    vit, decoder = model.vision.model, model.config.decoder
    block = vit.blocks[0]
    vision_config = dict(
        hidden_size=vit.embed_dim, intermediate_size=block.mlp.fc1.out_features, num_hidden_layers=len(vit.blocks),
        num_attention_heads=block.attn.num_heads, num_channels=3, image_size=model.config.vision.img_size,
        patch_size=vit.patch_embed.patch_size[0], hidden_act=timm_act_to_hf(block.mlp.act),
        layer_norm_eps=TIMM_SIGLIP_LN_EPS,
    )
    token_ids = {}
    if tokenizer is not None:
        token_ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
    text_config = to_hf_llama_config(decoder, **token_ids).to_dict()
    config_cls = SmolVLMConfig if model_type == "smolvlm" else Idefics3Config
    config = config_cls(
        vision_config=vision_config, text_config=text_config, scale_factor=model.config.projector.pixel_shuffle,
        image_token_id=model.config.image_token_id, tie_word_embeddings=decoder.tie_embeddings,
        pad_token_id=token_ids.get("pad_token_id"),
    )
    config.dtype = model.decoder.wte.weight.dtype  # from_pretrained(dtype="auto") then loads what was saved
    return config


def idefics3_hf_state_dict(model: MMGPT) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` under the checkpoint keys of ``SmolVLMForConditionalGeneration`` (and
    ``Idefics3ForConditionalGeneration``): ``model.{vision_model,connector,text_model}.*`` and an untied ``lm_head``.

    Raises:
        ValueError: the model does not fit the architecture, or two patches that read one row of HF's position
            table have different timm position embeddings (a trained tower on a grid HF buckets unevenly).
    """
    problems = _export_problems(model)
    if problems:
        raise ValueError("this model does not fit Idefics3/SmolVLM's architecture: " + "; ".join(problems))
    sd = model.state_dict()
    part = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
    vision, left = vit_to_hf(part("vision.model."), len(model.vision.model.blocks))
    if left:
        raise ValueError(f"the vision tower has tensors SigLIP has no place for: {sorted(left)}")
    # Patch i reads HF's row position_ids[i] (import took the timm table through the same buckets): scatter back.
    grid = model.config.vision.img_size // model.config.vision.patch_size
    ids = vision_position_ids(grid)  # (grid * grid,)
    timm_rows = vision["embeddings.position_embedding.weight"]  # (grid * grid, D), one per patch
    table = torch.zeros_like(timm_rows)
    table[ids] = timm_rows
    if not torch.equal(table[ids], timm_rows):
        raise ValueError(
            f"the vision tower's position embeddings differ for patches that read one row of HF's table (a "
            f"{grid}x{grid} grid, bucketed as HF buckets it): HF cannot express them; train with the tower frozen"
        )
    vision["embeddings.position_embedding.weight"] = table
    out = {"model.vision_model." + k: v for k, v in vision.items()}
    out["model.connector.modality_projection.proj.weight"] = sd["projector.mlp.0.weight"]
    for k, v in to_hf_llama_state_dict(part("decoder."), model.config.decoder).items():
        # model.* -> model.text_model.*; an untied lm_head.weight stays where it is.
        out["model.text_model." + k[len("model."):] if k.startswith("model.") else k] = v
    # Cloned: the q/k/v (and gate/up) pieces are views into one fused tensor, which safetensors refuses to save.
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export_idefics3(model: MMGPT, tokenizer, out_dir: str | Path, model_type: str = "smolvlm") -> None:
    """Write ``model`` as a HF directory that ``SmolVLMForConditionalGeneration.from_pretrained`` (or
    ``Idefics3ForConditionalGeneration``, ``AutoModelForImageTextToText``) loads with the same logits.

    The directory holds ``config.json``, ``model.safetensors``, the tokenizer (with its chat template) and an
    ``Idefics3Processor`` whose image processor tiles as ``model.processor`` does and writes ``image_seq_len``
    ``<image>`` tokens per tile. ``import_idefics3`` reads it back. (SmolVLM's own processor class needs the
    ``num2words`` package; it is written instead when that is installed, and writes the same text for images.)

    Args:
        model: an ``MMGPT`` of the Idefics3/SmolVLM architecture (``import_idefics3``'s, possibly fine-tuned, with
            LoRA adapters merged).
        tokenizer: its tokenizer (``load_idefics3_tokenizer``'s, or the one a training checkpoint carries).
        out_dir: the directory to write (created if missing).
        model_type: ``"smolvlm"`` or ``"idefics3"``.

    Raises:
        ValueError: naming every part of the model the architecture cannot express.
    """

    config = idefics3_config_from_mmgpt(model, model_type, tokenizer)
    tensors = idefics3_hf_state_dict(model)
    check_finite(tensors, f"cannot export to {out_dir}")
    processor = _hf_processor(model, copy.deepcopy(tokenizer), model_type)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(str(out_dir))  # the tokenizer's files too


def _hf_processor(model: MMGPT, tokenizer, model_type: str):
    """The HF processor that prepares pictures and prompts as mmgpt does for ``model``."""
    from transformers import Idefics3ImageProcessor, Idefics3ImageProcessorPil, Idefics3Processor

    tiling = model.processor
    fields = {k: v for k, v in tiling.to_hf().items() if k != "image_processor_type"}
    image_cls = Idefics3ImageProcessorPil if tiling.backend == "pil" else Idefics3ImageProcessor
    kwargs = dict(image_processor=image_cls(**fields), tokenizer=tokenizer, image_seq_len=model.image_seq_len,
                  chat_template=tokenizer.chat_template)
    if model_type == "smolvlm":
        from transformers.utils import is_num2words_available

        if is_num2words_available():
            from transformers import SmolVLMProcessor, SmolVLMVideoProcessor

            return SmolVLMProcessor(video_processor=SmolVLMVideoProcessor(), **kwargs)
    return Idefics3Processor(**kwargs)


__all__ = [
    "import_idefics3", "load_idefics3_tokenizer", "mmgpt_config_from_idefics3", "read_idefics3_config",
    "idefics3_state_dict", "vision_position_ids", "is_idefics3_dir", "export_idefics3", "idefics3_config_from_mmgpt",
    "idefics3_hf_state_dict", "ARCHITECTURES", "MODEL_TYPES",
]
