"""Every file format mmgpt reads and writes; loading a file never executes code from it.

An exported model is a directory::

    config.yaml           MMGPTConfig
    model.safetensors     weights
    tokenizer.json        the tokenizer (plus tokenizer_config.json)

A LoRA adapter is a directory as peft's ``PeftModel.save_pretrained`` writes it::

    adapter_config.json         peft's LoraConfig (r, lora_alpha, target_modules, base_model_name_or_path...)
    adapter_model.safetensors   the adapter weights, named base_model.model.<module path>.lora_A.weight etc.

It goes on the model it was trained on (``load_lora_adapter``); for a transformers LM as the decoder
(``decoder.backend: hf``) the module paths are the LM's own, so ``peft.PeftModel.from_pretrained(lm, directory)``
also loads it onto the plain LM.

A Lightning training checkpoint (``.ckpt``) carries, beside Lightning's own keys, the model config, the tokenizer
and the LoRA settings under the ``CKPT_*_KEY`` names, so that the file alone is enough to load the model. It is
read with ``torch.load(weights_only=True)``.

Only local files are read (a URL is refused: fetching is the user's explicit step), and weights that hold a NaN or
an infinity are neither written nor loaded: a diverged run must not pass for a trained model.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import PreTrainedTokenizerBase

from mmgpt.config import MMGPTConfig
from mmgpt.factory import create_model
from mmgpt.finite_weights import check_finite
from mmgpt.models.hf_decoder import HFDecoder
from mmgpt.models.lora import (
    LoRAConfig,
    apply_lora,
    load_lora_state_dict,
    lora_adapter_state_dict,
    lora_peft_config,
    merge_lora,
    peft_base,
)
from mmgpt.models.mmgpt import MMGPT
from mmgpt.tokenizer import load_tokenizer, tokenizer_from_files, tokenizer_to_files

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.safetensors"
CKPT_CONFIG_KEY, CKPT_TOKENIZER_KEY = "mmgpt_config", "mmgpt_tokenizer"
# Present when the decoder was trained with LoRA adapters: loading re-creates them, then merges them.
CKPT_LORA_KEY = "mmgpt_lora"
# peft's file names (peft.utils.CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME); its pickle, adapter_model.bin, is never read.
ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_ADAPTER_PICKLE_FILE = "adapter_model.bin"
# Lightning keeps the LightningModule's parameters under its attribute name: MMGPTModule.model.
_CKPT_MODEL_PREFIX = "model."
# A URL ("http://", "file://") or an fsspec path ("s3://", "simplecache::http://"): not a local path. Lightning and
# torch.hub would fetch such a path and unpickle it with weights_only=False.
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://|::)")


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URL or an fsspec protocol path rather than a local file system path."""
    return bool(_REMOTE.match(str(path)))


def local_path(path: str | Path, argument: str) -> Path:
    """``path`` as a local ``Path`` (``~`` expanded), or a ValueError naming ``argument`` if it is a URL.

    Args:
        path: what the user passed.
        argument: how the user passed it (``"ckpt_path"``, ``"init_from"``...), for the error message.
    """
    if is_remote(path):
        raise ValueError(
            f"{argument}={str(path)!r} is a URL; mmgpt reads checkpoints from local files only "
            f"(a remote pickle could run code when loaded): download it first and pass the local path"
        )
    return Path(path).expanduser()


def save_exported(model: MMGPT, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Write ``model`` and ``tokenizer`` as an exported directory at ``path``."""
    # Checked before anything is written: a NaN model must not leave a directory that looks like an export.
    check_finite(model.state_dict(), f"cannot export to {path}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Self-contained: the weights are all in model.safetensors, so no original checkpoint file is referenced.
    _without_vision_checkpoint(model.config).save_yaml(path / CONFIG_FILE)
    save_model(model, str(path / WEIGHTS_FILE))  # handles the tied embedding/lm_head weights
    tokenizer.save_pretrained(path)


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MMGPT, Any]:
    """``(model, tokenizer)`` from an exported directory."""
    path = local_path(path, "path")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an exported mmgpt model: {name} is missing")
    model = _model_for_weights(MMGPTConfig.from_yaml(path / CONFIG_FILE)).to(map_location)
    load_model(model, str(path / WEIGHTS_FILE), device=str(map_location))
    check_finite(model.state_dict(), str(path / WEIGHTS_FILE))
    return model, load_tokenizer(path)


def add_to_lightning_checkpoint(
    checkpoint: dict, model: MMGPT, tokenizer: PreTrainedTokenizerBase, lora: dict | None
) -> None:
    """What ``MMGPTModule.on_save_checkpoint`` adds, so ``mmgpt.load(ckpt)`` needs nothing else.

    Refuses (ValueError naming the tensors) a checkpoint whose weights are not finite: Lightning writes the file only
    after this hook returns, so a diverged model never lands on disk, whichever callback asked for the save.
    """
    check_finite(checkpoint["state_dict"], "refusing to write a training checkpoint")
    checkpoint[CKPT_CONFIG_KEY] = model.config.to_dict()
    checkpoint[CKPT_TOKENIZER_KEY] = tokenizer_to_files(tokenizer)
    checkpoint[CKPT_LORA_KEY] = lora


def tokenizer_from_lightning_checkpoint(checkpoint: dict) -> PreTrainedTokenizerBase | None:
    """The tokenizer a checkpoint carries, or None for one written without it."""
    files = checkpoint.get(CKPT_TOKENIZER_KEY)
    return tokenizer_from_files(files) if files is not None else None


def load_lightning_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MMGPT, Any]:
    """``(model, tokenizer)`` from a training checkpoint; LoRA adapters in it are merged into plain weights."""
    path = local_path(path, "path")
    ckpt = _read_lightning_checkpoint(path, map_location)
    model = _model_from_lightning_checkpoint(ckpt, path)
    if ckpt.get(CKPT_LORA_KEY):
        merge_lora(model.decoder)  # inference and export use plain weights
    return model.to(map_location), tokenizer_from_lightning_checkpoint(ckpt)


def save_lora_adapter(
    model_or_decoder: MMGPT | torch.nn.Module, directory: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write the decoder's LoRA adapter (not merged) as ``PeftModel.save_pretrained`` writes it.

    Args:
        model_or_decoder: an ``MMGPT`` or its decoder, with adapters injected (``apply_lora``) and trained.
        directory: created if needed; gets ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_model_name_or_path: the base model, recorded in the config as peft records it. Default: for a
            transformers LM as the decoder, its ``decoder.hf_path`` (the model ``PeftModel.from_pretrained`` takes);
            otherwise not recorded.

    Returns:
        ``directory`` as a ``Path``.
    """
    decoder = getattr(model_or_decoder, "decoder", model_or_decoder)
    directory = Path(directory)
    weights = lora_adapter_state_dict(decoder)
    # Checked before anything is written: a NaN adapter must not leave a directory that looks like one.
    check_finite(weights, f"cannot save the LoRA adapter to {directory}")
    is_hf = isinstance(decoder, HFDecoder)
    # What PeftModel.save_pretrained writes: the config in inference mode, the task for a transformers causal LM
    # (PeftModel.from_pretrained then returns a PeftModelForCausalLM, with generate), the base model when known.
    config = copy.deepcopy(lora_peft_config(decoder))
    config.inference_mode = True
    config.task_type = "CAUSAL_LM" if is_hf else None
    config.base_model_name_or_path = base_model_name_or_path or (decoder.config.hf_path if is_hf else None)
    if isinstance(config.target_modules, set):  # a set is written in hash order: sorted, the file is reproducible
        config.target_modules = sorted(config.target_modules)
    # Without a task, peft records the base model's class (what AutoPeftModel would import to build it).
    base = type(peft_base(decoder))
    auto_mapping = None if is_hf else {"base_model_class": base.__name__, "parent_library": base.__module__}
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})  # peft's metadata
    config.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)
    return directory


def load_lora_adapter(model: MMGPT, directory: str | Path, merge: bool = False) -> MMGPT:
    """Put a LoRA adapter directory (``save_lora_adapter``'s, or any peft LoRA adapter of this decoder) on ``model``.

    Args:
        model: the base model the adapter was trained on, without adapters (an ``MMGPT``; its decoder also works).
        directory: a local directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (a pickled
            ``adapter_model.bin`` is not read).
        merge: fold the adapter into the base weights (a plain model, as a merged export is) instead of keeping
            peft's LoRA layers (which ``merge_lora`` can merge later).

    Returns:
        ``model``, changed in place.

    Raises:
        FileNotFoundError: no such directory, or a file missing from it.
        ValueError: a URL; not a LoRA adapter; a config field that does more than add A/B matrices to the model's
            layers (``mmgpt.models.lora.check_loadable_config``: layer_replication, modules_to_save, DoRA...);
            weights that are not finite or do not fit the model (each named, with the directory); any failure
            while peft injects or loads the adapter (the original error as ``__cause__``). The model is then left
            as it was.
    """
    from peft import LoraConfig, PeftType

    directory = local_path(directory, "adapter")
    config_file, weights_file = directory / ADAPTER_CONFIG_FILE, directory / ADAPTER_WEIGHTS_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"no LoRA adapter directory at {directory}")
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} is not a LoRA adapter: {ADAPTER_CONFIG_FILE} is missing")
    if not weights_file.is_file():
        if (directory / _ADAPTER_PICKLE_FILE).is_file():
            raise ValueError(
                f"{directory} holds {_ADAPTER_PICKLE_FILE}, a pickle, which mmgpt does not read (unpickling can run "
                f"code): re-save the adapter with PeftModel.save_pretrained(dir, safe_serialization=True) to get "
                f"{ADAPTER_WEIGHTS_FILE}"
            )
        raise FileNotFoundError(f"{directory} is not a LoRA adapter: {ADAPTER_WEIGHTS_FILE} is missing")
    try:
        config = LoraConfig.from_pretrained(str(directory))
    except Exception as e:  # noqa: BLE001 - invalid JSON, unknown fields: the file is not a peft config we can use
        raise ValueError(f"{config_file}: cannot read as a peft LoRA config ({e})") from e
    if config.peft_type != PeftType.LORA:
        raise ValueError(f"{config_file}: peft_type is {config.peft_type}, expected LORA; mmgpt loads LoRA adapters")
    try:
        weights = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_file}: cannot read as safetensors ({e})") from e
    check_finite(weights, str(weights_file))
    decoder = getattr(model, "decoder", model)
    requires_grad = {name: p.requires_grad for name, p in decoder.named_parameters()}
    try:
        load_lora_state_dict(decoder, config, weights)
    except ValueError as e:  # peft's "target modules not found" too; the decoder is as it was
        # The cause is what went wrong first: a KeyError inside peft, say, rather than the ValueError wrapping it.
        raise ValueError(f"LoRA adapter {directory}: {e}") from (e.__cause__ or e)
    if merge:
        merge_lora(decoder)
        for name, p in decoder.named_parameters():  # a plain model again, trainable where it was
            p.requires_grad_(requires_grad[name])
    return model


def export_lora_adapter(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write the LoRA adapter of a training checkpoint as a peft adapter directory (``save_lora_adapter``).

    The adapter only: it goes on the model the run started from (its ``init_from``, or the model its config builds
    with ``decoder.hf_path``'s LM), with ``load_lora_adapter`` or, for a transformers LM, peft itself. The merged
    model is still what ``load_checkpoint(ckpt_path)`` and an export give.

    Args:
        ckpt_path: a local ``.ckpt`` of a run trained with ``model.lora``.
        out_dir: the adapter directory to write.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    path = local_path(ckpt_path, "ckpt_path")
    ckpt = _read_lightning_checkpoint(path, "cpu")
    if not ckpt.get(CKPT_LORA_KEY):
        raise ValueError(
            f"{path}: this run did not train LoRA adapters (model.lora was not set), so there is no adapter to "
            f"export: export the whole model instead"
        )
    model = _model_from_lightning_checkpoint(ckpt, path)
    # Recorded when the config names no transformers LM: the model the run started from, if it says which.
    init_from = (ckpt.get("hyper_parameters") or {}).get("init_from")
    base = None if isinstance(model.decoder, HFDecoder) else init_from
    return save_lora_adapter(model, out_dir, base_model_name_or_path=base)


def _read_lightning_checkpoint(path: Path, map_location: str | torch.device) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no Lightning checkpoint file at {path}")
    # weights_only=True: a checkpoint is data; loading it must never run code from the file.
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint we can read safely"
        raise ValueError(f"{path}: cannot read as a Lightning checkpoint with weights_only=True ({e})") from e
    if not isinstance(ckpt, dict) or CKPT_CONFIG_KEY not in ckpt or CKPT_TOKENIZER_KEY not in ckpt:
        raise ValueError(f"{path}: not an mmgpt training checkpoint (no model config or tokenizer inside)")
    return ckpt


def _model_from_lightning_checkpoint(ckpt: dict, path: Path) -> MMGPT:
    """The checkpoint's model with its weights, LoRA adapters (if any) injected and not merged."""
    model = _model_for_weights(MMGPTConfig.from_dict(ckpt[CKPT_CONFIG_KEY]))
    if lora := ckpt.get(CKPT_LORA_KEY):
        apply_lora(model.decoder, LoRAConfig(**lora))
    n = len(_CKPT_MODEL_PREFIX)
    state_dict = {k[n:]: v for k, v in ckpt["state_dict"].items() if k.startswith(_CKPT_MODEL_PREFIX)}
    check_finite(state_dict, str(path))
    model.load_state_dict(state_dict)
    return model


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MMGPT, Any]:
    """``(model, tokenizer)`` from an exported directory, a Lightning ``.ckpt`` file, or a saved HF vision-language
    model that mmgpt runs through its own modules (``SmolVLMForConditionalGeneration``,
    ``Idefics3ForConditionalGeneration``, ``PaliGemmaForConditionalGeneration``,
    ``LlavaOnevisionForConditionalGeneration``: safetensors, converted on load). Local paths only."""
    path = local_path(path, "path")
    if path.is_dir():
        hf = _hf_vlm_loader(path)
        if hf is not None:
            model, tokenizer = hf(path)
            check_finite(model.state_dict(), str(path))
            return model.to(map_location), tokenizer
        return load_exported(path, map_location)
    if path.is_file():
        return load_lightning_checkpoint(path, map_location)
    raise FileNotFoundError(f"no model at {path}: expected an exported directory or a Lightning .ckpt file")


def _hf_vlm_loader(path: Path):
    """``hf_dir -> (model, tokenizer)`` for a saved HF model family mmgpt imports, or None (read from
    ``config.json`` alone; the converters load only when one is needed)."""
    from mmgpt.convert.idefics3 import is_idefics3_dir
    from mmgpt.convert.llava_onevision import is_llava_onevision_dir
    from mmgpt.convert.paligemma import is_paligemma_dir

    if is_idefics3_dir(path):
        from mmgpt.convert.idefics3 import import_idefics3 as load
        from mmgpt.convert.idefics3 import load_idefics3_tokenizer as tokenizer
    elif is_paligemma_dir(path):
        from mmgpt.convert.paligemma import import_paligemma as load
        from mmgpt.convert.paligemma import load_paligemma_tokenizer as tokenizer
    elif is_llava_onevision_dir(path):
        from mmgpt.convert.llava_onevision import import_llava_onevision as load
        from mmgpt.convert.llava_onevision import load_llava_onevision_tokenizer as tokenizer
    else:
        return None

    def read(hf_dir: Path):
        model = load(hf_dir)
        return model, tokenizer(hf_dir, model.config.image_token_id)

    return read


def load_weights(model: MMGPT, path: str | Path) -> None:
    """Copy the weights of a trained model (a ``.ckpt`` or an exported directory) into ``model``.

    Args:
        model: a model of the same architecture.
        path: what ``load_checkpoint`` accepts; LoRA adapters in it are merged first.
    """
    path = local_path(path, "init_from")
    try:
        source, _ = load_checkpoint(path)
    except (ValueError, FileNotFoundError) as e:
        # Not type(e)(...): subclasses (UnicodeDecodeError, JSONDecodeError) take other constructor arguments.
        raise (FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError)(f"init_from: {e}") from e
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as e:
        raise ValueError(f"init_from={path}: its weights do not fit this model's architecture: {e}") from e


def _without_vision_checkpoint(config: MMGPTConfig) -> MMGPTConfig:
    return config.replace(vision=dataclasses.replace(config.vision, checkpoint_path=None))


def _model_for_weights(config: MMGPTConfig) -> MMGPT:
    """A model to load saved weights into: the vision tower's original checkpoint file is not read (the saved
    weights replace it, and an exported model must load where that file does not exist)."""
    return create_model(_without_vision_checkpoint(config))
