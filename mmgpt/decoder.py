"""A Llama-style causal decoder: RoPE, grouped-query attention through SDPA, SwiGLU, RMSNorm, a static KV cache.

Numerically it is HF ``LlamaForCausalLM`` (a test copies random weights across and compares logits); the layout
follows litgpt: fused ``qkv`` and fused gate/up projections, so one decode step runs fewer, larger matmuls —
at small sizes a CPU decode step is dominated by per-op overhead, not FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgpt.config import DecoderConfig


def build_rope_cache(
    seq_len: int, head_size: int, base: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables for rotary embeddings, in HF's "rotate half" layout (so Llama weights need no permute)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hs); cos/sin: (B, 1, T, hs) broadcast over heads
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys/values written at ``input_pos``: no reallocation and no ``torch.cat`` per step."""

    def __init__(
        self, batch_size: int, n_query_groups: int, max_seq_length: int, head_size: int,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_query_groups, max_seq_length, head_size)
        # Not persistent: a cache is scratch space, never part of a checkpoint.
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # input_pos: (T,) cache slots; k, v: (B, ng, T, hs). Returns the whole cache (B, ng, S, hs).
        self.k = self.k.to(k.dtype)
        self.v = self.v.to(v.dtype)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_head, self.n_query_groups, self.head_size = config.n_head, config.n_query_groups, config.head_size
        qkv_dim = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.qkv = nn.Linear(config.n_embd, qkv_dim, bias=False)
        self.proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        mask: torch.Tensor | None, input_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hs, nh, ng = self.head_size, self.n_head, self.n_query_groups
        q, k, v = self.qkv(x).split((nh * hs, ng * hs, ng * hs), dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        v = v.view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos was given but no KV cache is set up; call decoder.set_kv_cache() first")
            k, v = self.kv_cache(input_pos, k, v)  # (B, ng, S, hs)
        # Never pass both a mask and is_causal=True: SDPA rejects it, and the mask already says everything.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=ng != nh,
        )  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hs))


class SwiGLU(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        # gate and up projections fused into one matmul; split in forward.
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.norm_1 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.attn(self.norm_1(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.norm_2(x))


class Decoder(nn.Module):
    """The language model. ``forward`` returns logits; the loss belongs to the training code."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("decoder.vocab_size is not set: build the model with a tokenizer (vocab_size=len(tok))")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        cos, sin = build_rope_cache(config.block_size, config.head_size, config.rope_base)
        # Not persistent: derived from the config, so checkpoints stay portable across block sizes.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init for the projections that write into the residual stream keeps its variance
        # independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * config.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_kv_cache(
        self, batch_size: int, max_seq_length: int | None = None,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        """Allocate a static KV cache for ``batch_size`` rows of up to ``max_seq_length`` tokens."""
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length={max_seq_length} exceeds decoder.block_size={self.config.block_size}")
        device = device or self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        for block in self.h:
            block.attn.kv_cache = KVCache(
                batch_size, self.config.n_query_groups, max_seq_length, self.config.head_size, device, dtype
            )

    def clear_kv_cache(self) -> None:
        for block in self.h:
            block.attn.kv_cache = None

    @property
    def kv_cache_length(self) -> int:
        cache = self.h[0].attn.kv_cache
        return 0 if cache is None else cache.k.size(2)

    def forward(
        self,
        idx: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder.

        Args:
            idx: token ids ``(B, T)``; or give ``inputs_embeds`` ``(B, T, n_embd)`` instead.
            input_pos: ``(T,)`` KV-cache slots to write; ``None`` runs without a cache (training).
            position_ids: ``(B, T)`` RoPE positions; default ``input_pos`` (or ``0..T-1``). Differ from the
                cache slots for left-padded rows, whose first real token is position 0.
            attn_mask: boolean, True = attend. ``(B or 1, 1, T, T)`` without a cache, ``(B or 1, 1, T, S)``
                over all ``S`` cache slots with one. ``None`` means plain causal attention.

        Returns:
            Logits ``(B, T, vocab_size)``.
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx or inputs_embeds")
        x = self.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = input_pos if input_pos is not None else torch.arange(T, device=x.device)
            position_ids = position_ids.unsqueeze(0).expand(B, T)
        if int(position_ids.max()) >= self.config.block_size:
            raise ValueError(
                f"sequence position {int(position_ids.max())} is beyond decoder.block_size={self.config.block_size}"
            )
        cos = self.cos[position_ids].unsqueeze(1).to(x.dtype)  # (B, 1, T, hs)
        sin = self.sin[position_ids].unsqueeze(1).to(x.dtype)
        if input_pos is not None and attn_mask is None:
            # Causal over cache slots: query at slot p sees slots 0..p, never the unwritten rest of the cache.
            slots = torch.arange(self.kv_cache_length, device=x.device)
            attn_mask = (slots[None, :] <= input_pos[:, None])[None, None]  # (1, 1, T, S)
        for block in self.h:
            x = block(x, cos, sin, attn_mask, input_pos)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)
