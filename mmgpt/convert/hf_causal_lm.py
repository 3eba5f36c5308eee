"""Any local HF causal LM as mmgpt's decoder: read its config and its weights (a directory or a ``.gguf`` file).

Only local paths are read (``local_files_only``): nothing is downloaded. ``mmgpt.create_model`` calls these; the
decoder modules themselves never touch a file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mmgpt.config import DecoderConfig
from mmgpt.convert.hf_llama import check_hf_llama_config, from_hf_llama_config, from_hf_llama_state_dict
from mmgpt.models.decoder import Decoder


def names_model(path: str | Path, model_types: Sequence[str], architectures: Sequence[str]) -> bool:
    """Whether directory ``path`` holds a saved HF model whose ``config.json`` gives one of ``model_types`` or
    ``architectures`` (read as JSON: no transformers, no weights). A missing or unreadable file is False."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") in model_types or bool(set(config.get("architectures") or ()) & set(architectures))


def _from_pretrained_args(hf_path: str) -> tuple[str, dict[str, Any]]:
    """``(directory, kwargs)`` for transformers' ``from_pretrained`` on a local directory or ``.gguf`` file."""
    path = Path(hf_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"decoder.hf_path: no such directory or file {path} (only local paths are read)")
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name, "local_files_only": True}
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"decoder.hf_path={path} is not a HF model directory: config.json is missing")
    return str(path), {"local_files_only": True}


def resolve_hf_config(config: DecoderConfig) -> DecoderConfig:
    """Fill ``config.hf_config`` from ``config.hf_path``'s own config, so a saved model needs no ``hf_path``.

    With ``backend="native"``, the native decoder's sizes come from it too (a Llama-family config is required).
    """
    from transformers import AutoConfig

    directory, kwargs = _from_pretrained_args(config.hf_path)
    hf_config = AutoConfig.from_pretrained(directory, **kwargs)
    hf = hf_config.to_dict()
    hf.pop("quantization_config", None)  # a de-quantized GGUF is plain float weights
    fields = {**config.__dict__, "hf_config": hf}
    if config.backend == "native":
        check_hf_llama_config(hf_config, where=f"decoder.hf_path={config.hf_path}")
        native = from_hf_llama_config(hf_config)
        sizes = ("block_size", "n_layer", "n_head", "n_query_groups", "n_embd", "intermediate_size", "rope_base",
                 "norm_eps", "tie_embeddings")
        fields.update({name: getattr(native, name) for name in sizes})
    return DecoderConfig(**fields)


def load_pretrained_lm(config: DecoderConfig) -> nn.Module:
    """The pretrained ``AutoModelForCausalLM`` at ``config.hf_path``, float32, its vocabulary resized to
    ``config.vocab_size`` (new rows, i.e. ``<image>``, at the mean of the old ones, as HF does)."""
    from transformers import AutoModelForCausalLM

    if not config.hf_path:
        raise ValueError("decoder.hf_path is not set: nothing to load pretrained weights from")
    directory, kwargs = _from_pretrained_args(config.hf_path)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    if model.get_input_embeddings().num_embeddings != config.vocab_size:
        model.resize_token_embeddings(config.vocab_size, mean_resizing=True)
    return model


def load_pretrained_decoder(decoder: nn.Module, config: DecoderConfig) -> None:
    """Copy the pretrained LM at ``config.hf_path`` into ``decoder``: as it is into an ``HFDecoder``, converted
    into the native layout into a ``Decoder`` (``decoder.backend="native"``)."""
    state = load_pretrained_lm(config).state_dict()
    if isinstance(decoder, Decoder):
        decoder.load_state_dict(from_hf_llama_state_dict(state, config))
    else:
        decoder.model.load_state_dict(state)
