"""Any local HF causal LM as mmgpt's decoder, driven through ``inputs_embeds``.

``HFDecoder`` has the native ``Decoder``'s interface (``wte``, ``forward(..., input_pos, position_ids,
attn_mask, logits_to_keep)``, ``set_kv_cache`` / ``kv_cache_select`` / ``clear_kv_cache``), so the splice, the
loss and the whole generation engine (left padding, sampling, beams, streaming) work unchanged on Llama, Qwen2,
GPT-2 or any other ``AutoModelForCausalLM``. Masks still come from ``build_attention_mask``: HF models take a
prepared 4-D mask as it is. The KV cache is HF's ``DynamicCache``; its ``reorder_cache`` keeps, repeats or
reorders rows just like the native cache's ``select``, and where every layer is a plain full-attention
``DynamicLayer`` a prompt prefix is copied out of it and back in (a chat's earlier turns,
``mmgpt.generation.prefix_cache``) and rows join it between decode steps (continuous batching).

For a Llama-family LM, ``decoder.backend="native"`` converts the weights into the native decoder instead
(``mmgpt.convert.hf_llama``), which decodes faster; this path is for everything else and for using a checkpoint as
it is. Reading a checkpoint from disk is ``mmgpt.convert.hf_causal_lm``'s job.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from mmgpt.config import DecoderConfig
from mmgpt.models.attention import build_attention_mask
from mmgpt.models.decoder import BaseDecoder


class HFDecoder(BaseDecoder):
    """A transformers causal LM behind the native decoder's interface.

    Built from ``config.hf_config`` with random weights; ``mmgpt.create_model(config, pretrained=True)`` then
    reads ``config.hf_path`` (training does this once; a saved mmgpt model carries the weights itself). The
    vocabulary is resized to ``config.vocab_size`` (the LM's tokenizer plus ``<image>``).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        if config.hf_config is None:
            raise ValueError("HFDecoder needs decoder.hf_config: build the model with mmgpt.create_model(config)")
        hf = dict(config.hf_config)
        hf_config = AutoConfig.for_model(hf.pop("model_type"), **hf)
        self.config = config
        # SDPA: the 4-D masks built by build_attention_mask (boolean or additive) are passed through as they are.
        self.model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        if self.model.get_input_embeddings().num_embeddings != config.vocab_size:
            self.model.resize_token_embeddings(config.vocab_size, mean_resizing=False)  # weights come later
        self.cache = None
        self.cache_rows = 0  # the batch size the cache was set up for
        # transformers renamed forward's `past_key_values` to `cache` (5.2x); pass it under the name it knows.
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

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
        self.cache_rows = batch_size

    def clear_kv_cache(self) -> None:
        self.cache = None

    def kv_cache_select(self, rows: torch.Tensor) -> None:
        self.cache.reorder_cache(rows)

    def _plain_layers(self) -> list | None:
        """The cache's layers when every one is a plain full-attention ``DynamicLayer`` already written; else
        ``None``. Only those hold every slot as written: a sliding-window layer keeps the last window only, and
        recurrent or shared layers hold other states."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
            return None
        return layers

    def kv_cache_copy(self, length: int, rows: int = 1) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
        layers = self._plain_layers()
        if layers is None:
            return None
        return tuple(
            (layer.keys[:rows, :, :length].clone(), layer.values[:rows, :, :length].clone()) for layer in layers
        )

    def kv_cache_load(self, kv: tuple[tuple[torch.Tensor, torch.Tensor], ...], length: int) -> None:
        rows = self.cache_rows
        for i, (k, v) in enumerate(kv):
            # A DynamicCache grows by concatenation: the prefix goes in as the first `length` slots written.
            self.cache.update(k[:, :, :length].expand(rows, -1, -1, -1), v[:, :, :length].expand(rows, -1, -1, -1), i)

    @property
    def kv_cache_joinable(self) -> bool:
        return self._plain_layers() is not None

    def kv_cache_join(self, kv: tuple[tuple[torch.Tensor, torch.Tensor], ...], end: int, shift: int = 0) -> None:
        layers = self._plain_layers()
        if layers is None:
            raise NotImplementedError("rows join a running KV cache only when every layer is a plain DynamicLayer")
        for layer, (k, v) in zip(layers, kv, strict=True):
            # A DynamicCache's length is the number of slots written: after the move it is `end`, the joining
            # rows' last prompt slot + 1, where every row's next token goes.
            layer.keys, layer.values = _joined(layer.keys, k, end, shift), _joined(layer.values, v, end, shift)

    def kv_cache_stash(self) -> tuple:
        stashed, self.cache, self.cache_rows = (self.cache, self.cache_rows), None, 0
        return stashed

    def kv_cache_restore(self, stashed: tuple) -> None:
        self.cache, self.cache_rows = stashed

    def gradient_checkpointing_enable(self) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def decode(
        self, x: torch.Tensor, input_pos: torch.Tensor | None, position_ids: torch.Tensor,
        attn_mask: torch.Tensor | None, logits_to_keep: int, logits_at: torch.Tensor | None,
    ) -> torch.Tensor:
        T = x.size(1)
        if self.config.position_offset:
            position_ids = position_ids + self.config.position_offset  # (B, T)
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


def _joined(old: torch.Tensor, new: torch.Tensor, end: int, shift: int) -> torch.Tensor:
    # old: (B, ng, P, hs), P the slots written; new: (n, ng, L, hs) -> (B + n, ng, end, hs) with P + shift == end.
    B, ng, P, hs = old.shape
    if shift > 0:  # empty slots open at the front
        old = torch.cat([old.new_zeros(B, ng, shift, hs), old], dim=2)
    elif shift < 0:  # unused slots at the front go
        old = old[:, :, -shift:]
    rows = old.new_zeros(new.size(0), ng, end, hs)
    rows[:, :, end - new.size(2) :] = new
    return torch.cat([old, rows], dim=0)


def _scales_logits(config) -> bool:
    # Models whose causal-LM head does more than the output projection (Gemma 2's soft cap, Cohere's scale):
    # those compute every logit and select afterwards.
    return any(getattr(config, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale"))
