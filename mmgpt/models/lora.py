"""LoRA on the decoder through peft: inject, train only the adapters, merge back into plain weights.

peft's low-level ``inject_adapter_in_model`` keeps the module tree as it is (a targeted ``nn.Linear`` gains
``base_layer`` / ``lora_A`` / ``lora_B`` children), so the decoder's interface, the generation engine and the
checkpoint keys of everything else stay unchanged. ``merge_lora`` folds ``B @ A * alpha / r`` into each base
weight and puts the plain ``nn.Linear`` back: an exported model has no trace of peft and loads without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


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
    decoder = inject_adapter_in_model(peft_config, decoder)
    for name, p in decoder.named_parameters():
        p.requires_grad_("lora_" in name)
    return decoder


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter under ``module`` into its base weight and restore the plain layer.

    Returns:
        How many layers were merged.
    """
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            base = layer.get_base_layer()
            base.requires_grad_(True)
            setattr(module.get_submodule(parent_name) if parent_name else module, child, base)
            merged += 1
    return merged
