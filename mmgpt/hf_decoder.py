"""Any local HF causal LM as mmgpt's decoder, driven through ``inputs_embeds``.

``HFDecoder`` has the native ``Decoder``'s interface (``wte``, ``forward(..., input_pos, position_ids,
attn_mask, logits_to_keep)``, ``set_kv_cache`` / ``kv_cache_select`` / ``clear_kv_cache``), so the splice, the
loss and the whole generation engine (left padding, sampling, beams, streaming) work unchanged on Llama, Qwen2,
GPT-2 or any other ``AutoModelForCausalLM``. Masks still come from ``build_attention_mask``: HF models take a
prepared 4-D mask as it is. The KV cache is HF's ``DynamicCache``; its ``reorder_cache`` keeps, repeats or
reorders rows just like the native cache's ``select``.

For a Llama-family LM, ``mmgpt.hf_llama`` converts the weights into the native decoder instead, which decodes
faster; this path is for everything else and for using a checkpoint as it is.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mmgpt.config import DecoderConfig
from mmgpt.decoder import build_attention_mask, default_position_ids


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

    With ``hf_native``, the native decoder's sizes come from it too (a Llama-family config is required).
    """
    from transformers import AutoConfig

    from mmgpt.hf_llama import check_hf_llama_config, from_hf_llama_config

    directory, kwargs = _from_pretrained_args(config.hf_path)
    hf_config = AutoConfig.from_pretrained(directory, **kwargs)
    hf = hf_config.to_dict()
    hf.pop("quantization_config", None)  # a de-quantized GGUF is plain float weights
    fields = {**config.__dict__, "hf_config": hf}
    if config.hf_native:
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


class HFDecoder(nn.Module):
    """A transformers causal LM behind the native decoder's interface.

    Built from ``config.hf_config`` with random weights; ``load_pretrained()`` then reads ``config.hf_path``
    (training does this once; a saved mmgpt model carries the weights itself). The vocabulary is resized to
    ``config.vocab_size`` (the LM's tokenizer plus ``<image>``).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        if config.hf_config is None:
            raise ValueError("HFDecoder needs decoder.hf_config: fill it with resolve_hf_config(config)")
        hf = dict(config.hf_config)
        hf_config = AutoConfig.for_model(hf.pop("model_type"), **hf)
        self.config = config
        # SDPA: the 4-D masks built by build_attention_mask (boolean or additive) are passed through as they are.
        self.model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        if self.model.get_input_embeddings().num_embeddings != config.vocab_size:
            self.model.resize_token_embeddings(config.vocab_size, mean_resizing=False)  # weights come later
        self.cache = None
        # transformers renamed forward's `past_key_values` to `cache` (5.2x); pass it under the name it knows.
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def load_pretrained(self) -> None:
        """Load the pretrained weights from ``config.hf_path`` (a local directory or ``.gguf`` file)."""
        self.model.load_state_dict(load_pretrained_lm(self.config).state_dict())

    @property
    def wte(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_kv_cache(
        self, batch_size: int, max_seq_length: int | None = None,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        from transformers import DynamicCache

        # A DynamicCache grows as it is written; slots are always filled in order, so its length is the number
        # of slots written, which is what the masks from build_attention_mask cover.
        self.cache = DynamicCache(config=self.model.config)

    def clear_kv_cache(self) -> None:
        self.cache = None

    def kv_cache_select(self, rows: torch.Tensor) -> None:
        self.cache.reorder_cache(rows)

    def gradient_checkpointing_enable(self) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(
        self,
        idx: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)``; the arguments mean what they mean for ``Decoder.forward``."""
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx or inputs_embeds")
        x = self.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = default_position_ids(input_pos, B, T, x.device)
        if input_pos is not None:
            if self.cache is None:
                raise RuntimeError("input_pos was given but no KV cache is set up; call set_kv_cache() first")
            if attn_mask is None:
                written = self.cache.get_seq_length() + T
                attn_mask = build_attention_mask(torch.ones(1, written, dtype=torch.bool, device=x.device), input_pos)
        cache = {self._cache_arg: self.cache} if input_pos is not None else {}
        if logits_at is not None and input_pos is None and not _scales_logits(self.model.config):
            # The body's hidden states, then the head at the wanted positions only (what the causal-LM forward
            # does at every position).
            hidden = self.model.base_model(
                inputs_embeds=x, attention_mask=attn_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state  # (B, T, C)
            return self.model.get_output_embeddings()(hidden.flatten(0, 1)[logits_at])  # (K, vocab)
        out = self.model(
            inputs_embeds=x, attention_mask=attn_mask, position_ids=position_ids, use_cache=input_pos is not None,
            logits_to_keep=logits_to_keep, **cache,
        )
        return out.logits if logits_at is None else out.logits.flatten(0, 1)[logits_at]


def _scales_logits(config) -> bool:
    # Models whose causal-LM head does more than the output projection (Gemma 2's soft cap, Cohere's scale):
    # those compute every logit and select afterwards.
    return any(getattr(config, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale"))
