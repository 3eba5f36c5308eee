"""LoRA on the decoder through peft: inject, train only the adapters, merge back into plain weights.

peft's low-level ``inject_adapter_in_model`` keeps the module tree as it is (a targeted ``nn.Linear`` gains
``base_layer`` / ``lora_A`` / ``lora_B`` children), so the decoder's interface, the generation engine and the
checkpoint keys of everything else stay unchanged. ``merge_lora`` folds ``B @ A * alpha / r`` into each base
weight and puts the plain ``nn.Linear`` back: an exported model has no trace of peft and loads without it.

An adapter also travels on its own, as ``PeftModel.save_pretrained`` writes it: ``lora_adapter_state_dict`` names
its weights as peft does (``base_model.model.<module path>.lora_A.weight``) and ``load_lora_state_dict`` puts such
weights back. peft wraps the module that ``peft_base`` returns: for an ``HFDecoder`` the transformers model inside
it, so that module paths are the LM's own and the adapter loads onto the plain LM with
``PeftModel.from_pretrained(lm, directory)``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from mmgpt.models.hf_decoder import HFDecoder

if TYPE_CHECKING:
    from peft import LoraConfig

# Every key of a peft adapter file starts with this: PeftModel.base_model (the LoraModel) .model (the wrapped model).
PEFT_KEY_PREFIX = "base_model.model."
# inject_adapter_in_model's name for a model's only adapter; peft drops it from the keys of a saved adapter.
_ADAPTER_NAME = "default"
# How many offending keys an error names before summing up the rest.
_NAMED = 8

# The fields of peft's LoraConfig that an adapter file may set: which linear layers get A/B matrices, their rank and
# scale (rsLoRA's alpha / sqrt(r) included), dropout, and bookkeeping. init_lora_weights says how training started
# (PiSSA, OLoRA, CorDA, EVA...): the file's A/B replace whatever it makes, and load_lora_state_dict injects with
# init_lora_weights=False, because PiSSA and its kind rewrite the base weights as they initialize, and loading the
# same adapter twice would then give two different models. Any other field set away from peft's default is refused
# (its name in the error): each does more than add B @ A to a layer of the model as it is.
_LOADABLE_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "use_rslora",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "runtime_config",
    "init_lora_weights", "eva_config", "corda_config", "lora_ga_config",  # how training started; unused here
})
# Why, for the refused fields an adapter is most likely to set.
_REFUSED_BECAUSE = {
    "layer_replication": "it stacks copies of the decoder's layers, a different model from the base",
    "modules_to_save": "it replaces whole modules of the base model (the output head, the embeddings) with the file's",
    "trainable_token_indices": "it replaces rows of the base model's token embeddings with the file's",
    "megatron_config": "it is for Megatron tensor-parallel layers, and has peft import the module megatron_core names",
    "megatron_core": "it names a module for peft to import, for Megatron tensor-parallel layers",
    "loftq_config": "a LoftQ adapter goes with a quantized copy of the base weights, not with the weights themselves",
    "use_dora": "DoRA rescales each base weight by a magnitude vector; mmgpt merges plain LoRA only",
    "bias": "it makes the file's biases replace the base model's",
    "lora_bias": "a bias on lora_B is not a plain LoRA adapter",
}


@dataclass
class LoRAConfig:
    """Low-rank adapters on the decoder's linear layers."""

    # Rank 8 with alpha 16 (scale 2) is the common starting point of the LoRA/QLoRA papers' sweeps.
    r: int = 8
    alpha: float = 16.0
    # A little dropout on the adapter input regularises small fine-tuning sets.
    dropout: float = 0.05
    # Module names to adapt (suffixes, as peft matches them); None: every linear layer of the decoder except the
    # output head (the head is tied to the embeddings in most small LMs, and adapting it would untie them).
    target_modules: list[str] | None = None


def lora_target_modules(decoder: nn.Module) -> list[str]:
    """The distinct names of the decoder's ``nn.Linear`` layers, output head excluded."""
    head = decoder.get_output_embeddings() if hasattr(decoder, "get_output_embeddings") else None
    head = head or getattr(decoder, "lm_head", None) or getattr(getattr(decoder, "model", None), "lm_head", None)
    linear = (name for name, m in decoder.named_modules() if isinstance(m, nn.Linear) and m is not head)
    return sorted({name.rsplit(".", 1)[-1] for name in linear})


def apply_lora(decoder: nn.Module, config: LoRAConfig) -> nn.Module:
    """Inject LoRA adapters into ``decoder`` in place and freeze everything else in it.

    Args:
        decoder: the native ``Decoder`` or an ``HFDecoder``.
        config: rank, alpha, dropout and target modules.

    Returns:
        ``decoder``, with only ``lora_`` parameters trainable.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = config.target_modules or lora_target_modules(decoder)
    peft_config = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets)
    # In place: the module tree, and so the checkpoint keys, are the same whichever module peft is given.
    inject_adapter_in_model(peft_config, peft_base(decoder))
    for name, p in decoder.named_parameters():
        p.requires_grad_("lora_" in name)
    return decoder


def peft_base(decoder: nn.Module) -> nn.Module:
    """The module peft wraps: an ``HFDecoder``'s transformers model, or the native decoder itself."""
    return decoder.model if isinstance(decoder, HFDecoder) else decoder


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` holds LoRA layers (injected and not merged)."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def lora_peft_config(decoder: nn.Module) -> LoraConfig:
    """The peft ``LoraConfig`` the decoder's adapters were injected with (a ValueError if there are none)."""
    base = peft_base(decoder)
    if not has_lora(base) or _ADAPTER_NAME not in getattr(base, "peft_config", {}):
        raise ValueError(
            "the decoder has no LoRA adapters: train with model.lora set, or inject them with apply_lora(decoder, ...)"
        )
    return base.peft_config[_ADAPTER_NAME]


def lora_adapter_state_dict(decoder: nn.Module) -> dict[str, torch.Tensor]:
    """The decoder's adapter weights, named as ``PeftModel.save_pretrained`` names them.

    Returns:
        ``{"base_model.model.<module path>.lora_A.weight": tensor, ...}`` (module paths as ``peft_base`` has them);
        the adapters only: the LoRA matrices of a targeted layer, never the base weights or the embeddings.
    """
    from peft import get_peft_model_state_dict

    lora_peft_config(decoder)  # a clear error when there is no adapter
    # save_embedding_layers=False: peft's "auto" would look the base model up (a network call for a repo id) to see
    # whether the vocabulary was resized; an mmgpt adapter is meant for the base it was trained on, embeddings and all.
    weights = get_peft_model_state_dict(peft_base(decoder), adapter_name=_ADAPTER_NAME, save_embedding_layers=False)
    return {PEFT_KEY_PREFIX + k: v for k, v in weights.items()}


def check_loadable_config(config: LoraConfig) -> None:
    """Refuse a peft LoRA config that would do more than add the file's A/B matrices to the decoder's layers.

    An adapter file is data from elsewhere: a field that copies layers, replaces modules or embeddings, rescales the
    base weights (DoRA) or makes peft import a module must not reach peft. Only the fields in ``_LOADABLE_FIELDS``
    may differ from peft's defaults.

    Raises:
        ValueError: naming the first field set to something mmgpt does not load, its value and why.
    """
    from peft import LoraConfig

    defaults = LoraConfig()
    for field in dataclasses.fields(LoraConfig):
        name = field.name
        value = getattr(config, name, None)
        if name in _LOADABLE_FIELDS or value == getattr(defaults, name):
            continue
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        why = _REFUSED_BECAUSE.get(name, "it is not a plain LoRA adapter")
        raise ValueError(
            f"the adapter config sets {name}={shown}, which mmgpt does not load: {why}. mmgpt loads LoRA adapters "
            f"that add A/B matrices to the model's own linear layers, with {name} left at {getattr(defaults, name)!r}"
        )


def load_lora_state_dict(decoder: nn.Module, config: LoraConfig, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Inject adapters per ``config`` into ``decoder`` and load ``state_dict`` into them, strictly.

    The adapters hold exactly the weights of ``state_dict``: they are injected with ``init_lora_weights=False``
    whatever ``config`` says, so an initialization that rewrites the base weights (PiSSA, OLoRA...) never runs.

    Args:
        decoder: the native ``Decoder`` or an ``HFDecoder``, without adapters.
        config: the peft config the adapter was saved with (not changed).
        state_dict: adapter weights named as ``lora_adapter_state_dict`` names them.

    Raises:
        ValueError: the decoder has adapters already; ``config`` sets a field ``check_loadable_config`` refuses
            (both before the decoder is touched); ``config`` targets no module of it; the weights do not fit the
            injected adapters (keys missing or unexpected, shapes that differ; each named); or anything else fails
            while injecting or loading (the original error as ``__cause__``). The decoder is then left as it was: the
            same modules in the same places, the same ``requires_grad`` flags.
    """
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    base = peft_base(decoder)
    if has_lora(base):
        raise ValueError("the decoder has LoRA adapters already: load an adapter onto a model without them")
    check_loadable_config(config)
    config = copy.deepcopy(config)
    config.init_lora_weights = False  # the A/B come from state_dict; nothing else may touch the weights
    # What a failure puts back: every module's children (peft swaps layers for its wrappers) and trainable flags.
    children = {m: dict(m._modules) for m in base.modules()}
    requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
    try:
        inject_adapter_in_model(config, base, adapter_name=_ADAPTER_NAME)
        expected = lora_adapter_state_dict(decoder)
        _check_fits(state_dict, expected)
        n = len(PEFT_KEY_PREFIX)
        result = set_peft_model_state_dict(base, {k[n:]: v for k, v in state_dict.items()}, adapter_name=_ADAPTER_NAME)
        if result.unexpected_keys:  # checked above; here only if peft would map a key elsewhere than it names it
            raise ValueError(f"weights peft did not place: {_shown(result.unexpected_keys)}")
    except BaseException as e:
        # As it was: no half-injected adapters with random weights, no peft wrappers, nothing frozen.
        for module, kids in children.items():
            module._modules.clear()
            module._modules.update(kids)
        for m in base.modules():
            m.__dict__.pop("peft_config", None)
        for name, p in base.named_parameters():
            p.requires_grad_(requires_grad[name])
        if isinstance(e, ValueError) or not isinstance(e, Exception):  # ours, peft's own, or Ctrl-C
            raise
        raise ValueError(f"peft could not put the adapter on this decoder: {type(e).__name__}: {e}") from e


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter under ``module`` into its base weight and restore the plain layer.

    Returns:
        How many layers were merged.
    """
    return _remove_lora(module, merge=True)


def _remove_lora(module: nn.Module, merge: bool = False) -> int:
    """Put every LoRA layer's base layer back in its place (after folding the adapter into it if ``merge``)."""
    from peft.tuners.lora import LoraLayer

    removed = 0
    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            if merge:
                layer.merge()
            parent_name, _, child = name.rpartition(".")
            base = layer.get_base_layer()
            base.requires_grad_(True)
            setattr(module.get_submodule(parent_name) if parent_name else module, child, base)
            removed += 1
    # The adapters' config goes with them: a later injection starts afresh instead of adding a second adapter.
    for m in module.modules():
        if "peft_config" in m.__dict__:
            del m.peft_config
    return removed


def _check_fits(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(expected.keys() & state_dict.keys()) if state_dict[k].shape != expected[k].shape
    ]
    problems = [
        f"{what}: {_shown(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys
    ]
    if problems:
        raise ValueError(
            "the adapter weights do not fit the adapters its config injects into this model ("
            + "; ".join(problems) + "): was it saved for another base model?"
        )


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:_NAMED]) + (f" and {len(keys) - _NAMED} more" if len(keys) > _NAMED else "")
