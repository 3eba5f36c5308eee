"""Every file format mmgpt reads and writes; loading a file never executes code from it.

An exported model is a directory::

    config.yaml           MMGPTConfig
    model.safetensors     weights
    tokenizer.json        the tokenizer (plus tokenizer_config.json)

A Lightning training checkpoint (``.ckpt``) carries, beside Lightning's own keys, the model config, the tokenizer
and the LoRA settings under the ``CKPT_*_KEY`` names, so that the file alone is enough to load the model. It is
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from transformers import PreTrainedTokenizerBase

from mmgpt.config import MMGPTConfig
from mmgpt.factory import create_model
from mmgpt.models.lora import LoRAConfig, apply_lora, merge_lora
from mmgpt.models.mmgpt import MMGPT
from mmgpt.tokenizer import load_tokenizer, tokenizer_from_files, tokenizer_to_files

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.safetensors"
CKPT_CONFIG_KEY, CKPT_TOKENIZER_KEY = "mmgpt_config", "mmgpt_tokenizer"
# Present when the decoder was trained with LoRA adapters: loading re-creates them, then merges them.
CKPT_LORA_KEY = "mmgpt_lora"
# Lightning keeps the LightningModule's parameters under its attribute name: MMGPTModule.model.
_CKPT_MODEL_PREFIX = "model."


def save_exported(model: MMGPT, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Write ``model`` and ``tokenizer`` as an exported directory at ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Self-contained: the weights are all in model.safetensors, so no original checkpoint file is referenced.
    _without_vision_checkpoint(model.config).save_yaml(path / CONFIG_FILE)
    save_model(model, str(path / WEIGHTS_FILE))  # handles the tied embedding/lm_head weights
    tokenizer.save_pretrained(path)


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MMGPT, Any]:
    """``(model, tokenizer)`` from an exported directory."""
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an exported mmgpt model: {name} is missing")
    model = _model_for_weights(MMGPTConfig.from_yaml(path / CONFIG_FILE)).to(map_location)
    load_model(model, str(path / WEIGHTS_FILE), device=str(map_location))
    return model, load_tokenizer(path)


def add_to_lightning_checkpoint(
    checkpoint: dict, model: MMGPT, tokenizer: PreTrainedTokenizerBase, lora: dict | None
) -> None:
    """What ``MMGPTModule.on_save_checkpoint`` adds, so ``mmgpt.load(ckpt)`` needs nothing else."""
    checkpoint[CKPT_CONFIG_KEY] = model.config.to_dict()
    checkpoint[CKPT_TOKENIZER_KEY] = tokenizer_to_files(tokenizer)
    checkpoint[CKPT_LORA_KEY] = lora


def tokenizer_from_lightning_checkpoint(checkpoint: dict) -> PreTrainedTokenizerBase | None:
    """The tokenizer a checkpoint carries, or None for one written without it."""
    files = checkpoint.get(CKPT_TOKENIZER_KEY)
    return tokenizer_from_files(files) if files is not None else None


def load_lightning_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MMGPT, Any]:
    """``(model, tokenizer)`` from a training checkpoint; LoRA adapters in it are merged into plain weights."""
    path = Path(path)
    # weights_only=True: a checkpoint is data; loading it must never run code from the file.
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint we can read safely"
        raise ValueError(f"{path}: cannot read as a Lightning checkpoint with weights_only=True ({e})") from e
    if not isinstance(ckpt, dict) or CKPT_CONFIG_KEY not in ckpt or CKPT_TOKENIZER_KEY not in ckpt:
        raise ValueError(f"{path}: not an mmgpt training checkpoint (no model config or tokenizer inside)")
    model = _model_for_weights(MMGPTConfig.from_dict(ckpt[CKPT_CONFIG_KEY]))
    lora = ckpt.get(CKPT_LORA_KEY)
    if lora:
        apply_lora(model.decoder, LoRAConfig(**lora))
    n = len(_CKPT_MODEL_PREFIX)
    model.load_state_dict({k[n:]: v for k, v in ckpt["state_dict"].items() if k.startswith(_CKPT_MODEL_PREFIX)})
    if lora:
        merge_lora(model.decoder)  # inference and export use plain weights
    return model.to(map_location), tokenizer_from_lightning_checkpoint(ckpt)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MMGPT, Any]:
    """``(model, tokenizer)`` from an exported directory or a Lightning ``.ckpt`` file."""
    path = Path(path)
    if path.is_dir():
        return load_exported(path, map_location)
    if path.is_file():
        return load_lightning_checkpoint(path, map_location)
    raise FileNotFoundError(f"no model at {path}: expected an exported directory or a Lightning .ckpt file")


def load_weights(model: MMGPT, path: str | Path) -> None:
    """Copy the weights of a trained model (a ``.ckpt`` or an exported directory) into ``model``.

    Args:
        model: a model of the same architecture.
        path: what ``load_checkpoint`` accepts; LoRA adapters in it are merged first.
    """
    source, _ = load_checkpoint(path)
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
