"""A Llama-style causal decoder: RoPE, grouped-query attention through SDPA, SwiGLU, RMSNorm, a static KV cache.

Who sees whom is decided in ``mmgpt.models.attention``: causal with padding hidden, or a prefix-LM
(``decoder.attention="prefix"``) whose image and prompt attend to each other both ways.

Numerically it is HF ``LlamaForCausalLM`` (a test copies random weights across and compares logits); the layout
follows litgpt: fused ``qkv`` and fused gate/up projections, so one decode step runs fewer, larger matmuls —
at small sizes a CPU decode step is dominated by per-op overhead, not FLOPs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmgpt.config import DecoderConfig
from mmgpt.models.attention import build_attention_mask, default_position_ids


def build_rope_cache(
    seq_len: int, head_size: int, base: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables for rotary embeddings, in HF's "rotate half" layout (so Llama weights need no permute).

    The sin table comes with its first half negated: ``apply_rope`` then rotates with one ``roll`` instead of
    slicing, negating and concatenating (the same numbers, bit for bit, in fewer ops per decode step).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    cos = torch.cat((freqs, freqs), dim=-1).cos()  # (T, hs)
    signed_sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)  # (T, hs)
    return cos, signed_sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, nh, hs); cos/signed_sin: (B, T, 1, hs) broadcast over heads.
    # HF's rotate_half(x) * sin is (-x2 * s, x1 * s), which is roll(x) = (x2, x1) times (-s, s).
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * signed_sin


class KVCache(nn.Module):
    """Preallocated keys/values written at ``input_pos``: no reallocation and no ``torch.cat`` per step.

    ``k`` and ``v`` are the first rows of ``k_store`` and ``v_store``, which keep room for as many rows as the
    cache has held: rows that leave (``select``) free theirs, and rows that join later (``join``) take them
    without copying the others (continuous batching).
    """

    def __init__(
        self, batch_size: int, n_query_groups: int, max_seq_length: int, head_size: int,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_query_groups, max_seq_length, head_size)
        # Not persistent: a cache is scratch space, never part of a checkpoint.
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.k_store, self.v_store = self.k, self.v

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # input_pos: (T,) cache slots; k, v: (B, ng, T, hs). Returns the whole cache (B, ng, S, hs).
        if self.k.dtype != k.dtype:  # only when autocast changed the compute dtype after set_kv_cache
            self.k, self.v = self.k.to(k.dtype), self.v.to(v.dtype)
            self.k_store, self.v_store = self.k, self.v
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat, or reorder) batch rows: drops finished rows, expands one prompt into several
        samples or beams, and follows beam search's choice of parents. Costs one copy, never per token."""
        n = rows.numel()
        if self.k.requires_grad:  # out= records no gradient (a cache under autograd: a test, not generation)
            self.k_store, self.v_store = self.k.index_select(0, rows), self.v.index_select(0, rows)
        else:
            stores = []
            for old, store in ((self.k, self.k_store), (self.v, self.v_store)):
                new = old.new_empty(max(n, store.size(0)), *old.shape[1:])  # the rows let go stay free for joins
                torch.index_select(old, 0, rows, out=new[:n])
                stores.append(new)
            self.k_store, self.v_store = stores
        self.k, self.v = self.k_store[:n], self.v_store[:n]

    def join(self, k: torch.Tensor, v: torch.Tensor, end: int, shift: int) -> None:
        """Move every row's slots by ``shift`` and append rows whose keys/values ``k``, ``v`` ``(n, ng, L, hs)``
        fill slots ``[end - L, end)``. Without a move, and with free rows in the store, nothing else is copied;
        otherwise the cache is copied once, as by ``select``."""
        B, n, L = self.k.size(0), k.size(0), k.size(2)
        if shift == 0 and self.k_store.size(0) >= B + n:
            for store, new in ((self.k_store, k), (self.v_store, v)):
                # Masked slots must be finite for a masked score to be -inf and not NaN; later slots are written
                # before they are read (attention covers the slots written so far).
                store[B : B + n, :, : end - L] = 0
                store[B : B + n, :, end - L : end] = new
        else:
            rows = max(B + n, self.k_store.size(0))
            self.k_store, self.v_store = _joined(self.k, k, end, shift, rows), _joined(self.v, v, end, shift, rows)
        self.k, self.v = self.k_store[: B + n], self.v_store[: B + n]


def _joined(old: torch.Tensor, new: torch.Tensor, end: int, shift: int, rows: int) -> torch.Tensor:
    # old: (B, ng, S, hs), new: (n, ng, L, hs) -> a store of `rows` rows whose first B + n are the old rows and the
    # new ones; slot j of an old row moves to j + shift (the slots pushed out at either end are unused: the caller
    # checks). Slots from `end` on are not written yet and never read before they are, so they are left as
    # allocated; the empty slots before them are zeroed (masked slots must be finite, see KVCache.join).
    B, S, n, L = old.size(0), old.size(2), new.size(0), new.size(2)
    out = old.new_empty(rows, old.size(1), S, old.size(3))
    if shift >= 0:
        out[:B, :, :shift] = 0
        out[:B, :, shift:end] = old[:, :, : end - shift]
    else:
        out[:B, :, :end] = old[:, :, -shift : end - shift]
    out[B : B + n, :, : end - L] = 0
    out[B : B + n, :, end - L : end] = new
    return out


def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one query per row (a decode step), written out.

    What SDPA computes, in the form that is fastest on a CPU. One row (compiled): products summed, so that the
    scores, the softmax and the weighted sum fuse into one loop, while SDPA's CPU kernel costs far more than this
    little arithmetic (a third of a step). Several rows: two batched matmuls, each key/value head's query heads
    against its keys; at 16 rows they took half of SDPA's time and of the fused loop's, which does a horizontal sum
    per key (one thread, 8 query heads on 2 key/value heads of 32, 150 keys: 108 us, SDPA 205, the loop 309).

    Args:
        q: ``(B, nh, 1, hs)``; k, v: ``(B, ng, S, hs)`` with ``nh`` a multiple of ``ng`` (grouped queries).
        mask: ``(B or 1, 1, 1, S)`` boolean (True = attend) or additive, or ``None``.

    Returns:
        ``(B, nh, 1, hs)``.
    """
    B, nh, _, hs = q.shape
    ng = k.size(1)
    if B == 1:
        q = q.view(B, ng, nh // ng, 1, hs)  # the query heads that share each key/value head
        scores = (q * k[:, :, None]).sum(-1) * hs**-0.5  # (B, ng, nh/ng, S)
    else:
        scores = (q.view(B, ng, nh // ng, hs) * hs**-0.5) @ k.transpose(-1, -2)  # (B, ng, nh/ng, S)
    if mask is not None:
        mask = mask.view(mask.size(0), 1, 1, -1)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if B == 1:
        y = (scores.softmax(dim=-1)[..., None] * v[:, :, None]).sum(-2)  # (B, ng, nh/ng, hs)
    else:
        y = scores.softmax(dim=-1) @ v  # (B, ng, nh/ng, hs)
    return y.view(B, nh, 1, hs)


# While generation decodes (``mmgpt.generation.f32_gemm.fast_inference``), a Linear that needs no gradient multiplies
# on the CPU's fastest path for its rows (one thread of a 2-core AMD EPYC with AVX-512; benchmarks/README.md,
# "Generation speed"):
# * at most GEMM_MAX_ROWS rows (a decode step): mmgpt's float32 kernel on a packed copy of the weight, 2-3x MKL's
#   speed there, where generation has made one (see ``mmgpt.generation.f32_gemm`` for when);
# * more rows (a prefill), with at least ONEDNN_MIN_MACS multiply-adds, on an AVX-512 CPU: oneDNN, 190-205 GFLOP/s
#   against MKL's ~90; but a call costs it ~15 us against MKL's ~4, so smaller products stay with MKL, as do those of
#   a compiled step (Inductor lowers oneDNN's linear only on weights that are graph constants).
# The products are the same, summed in another order.
GEMM_MAX_ROWS = 16
ONEDNN_MIN_MACS = 1 << 23
# With AVX2 kernels only (ONEDNN_MAX_CPU_ISA=AVX2) oneDNN's linear was ~15 % faster than MKL's alone, but first
# tokens came no sooner in benchmarks/generate.py (8m-gqa, batch 16: 361-370 ms against 335-345 with MKL): there
# prefills stay with MKL.
_ONEDNN = torch.backends.mkldnn.is_available() and "AVX512" in torch.backends.cpu.get_cpu_capability()


class Linear(nn.Linear):
    """``nn.Linear`` with a faster inference path for inputs that need no gradient (see ``GEMM_MAX_ROWS``), taken
    while ``fast`` is set: generation sets it, and the fields below, for the time it decodes
    (``mmgpt.generation.f32_gemm.fast_inference``)."""

    fast = False
    packed: torch.Tensor | None = None  # the weight in the layout of the operator mmgpt::f32_gemm, where that runs
    gemm = None  # the same operator's function, called directly by eager code (no dispatch)
    kernel_min_macs = 0  # products with fewer multiply-adds stay with MKL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        macs = rows * self.in_features * self.out_features
        # `packed` read last: a compiled step checks every tensor it reads at each call (~2 us per tensor).
        if rows <= GEMM_MAX_ROWS and macs >= self.kernel_min_macs and self.packed is not None:
            x2 = x.reshape(rows, self.in_features)
            if torch.compiler.is_compiling():
                y = torch.ops.mmgpt.f32_gemm(x2, self.packed, self.out_features)
            else:
                y = self.gemm(x2, self.packed, self.out_features)
            return y.view(*x.shape[:-1], self.out_features)
        if macs >= ONEDNN_MIN_MACS and _ONEDNN and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_head, self.n_query_groups, self.head_size = config.n_head, config.n_query_groups, config.head_size
        qkv_dim = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.qkv = Linear(config.n_embd, qkv_dim, bias=False)
        self.proj = Linear(config.n_head * config.head_size, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        mask: torch.Tensor | None, input_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hs, nh, ng = self.head_size, self.n_head, self.n_query_groups
        qkv = self.qkv(x).view(B, T, nh + 2 * ng, hs)
        # Queries and keys are rotated in one call: at decode time every saved op counts.
        qk = apply_rope(qkv[:, :, : nh + ng], cos, sin)  # (B, T, nh + ng, hs)
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hs)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, ng, T, hs)
        v = qkv[:, :, nh + ng :].transpose(1, 2)  # (B, ng, T, hs)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos was given but no KV cache is set up; call decoder.set_kv_cache() first")
            k, v = self.kv_cache(input_pos, k, v)  # (B, ng, S, hs)
            if mask is not None and mask.size(-1) < k.size(2):
                # A mask over the first S' slots says the rest are unwritten: skip them instead of masking them.
                k, v = k[:, :, : mask.size(-1)], v[:, :, : mask.size(-1)]
        if T == 1 and not self.training and (B > 1 or torch.compiler.is_compiling()):
            # A decode step of several rows, or a compiled one: faster than SDPA's CPU kernel (see there).
            y = single_query_attention(q, k, v, mask)
        else:
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
        self.fc = Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = Linear(config.intermediate_size, config.n_embd, bias=False)

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


class BaseDecoder(nn.Module):
    """What every decoder offers the rest of mmgpt: ``wte``, ``forward`` returning logits, and a KV cache
    (``set_kv_cache`` / ``kv_cache_select`` / ``clear_kv_cache``, ``kv_cache_copy`` / ``kv_cache_load`` for a
    prompt prefix reused by the next prompt, and ``kv_cache_stash`` / ``kv_cache_restore`` / ``kv_cache_join`` for
    rows joining a running batch). The native ``Decoder`` and ``HFDecoder`` implement ``decode``; the splice, the
    loss and the whole generation engine work with either."""

    wte: nn.Module

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
        """Run the decoder.

        Args:
            idx: token ids ``(B, T)``; or give ``inputs_embeds`` ``(B, T, n_embd)`` instead.
            input_pos: ``(T,)`` KV-cache slots to write; ``None`` runs without a cache (training).
            position_ids: ``(B, T)`` RoPE positions; default ``input_pos`` (or ``0..T-1``). Differ from the
                cache slots for left-padded rows, whose first real token is position 0.
            attn_mask: boolean (True = attend) or additive float, from ``build_attention_mask``.
                ``(B or 1, 1, T, T)`` without a cache; with one, ``(B or 1, 1, T, S')`` over the first ``S'``
                cache slots (the slots after them are not attended at all). ``None`` means plain causal
                attention.
            logits_to_keep: compute logits for the last this many positions only (0 = all), as HF: a prefill
                needs just the last one, and the vocabulary projection is its largest matmul.
            logits_at: ``(K,)`` indices into the ``B * T`` positions flattened row-major: compute logits there only.
                For training, whose loss needs them only where a target is predicted (a tenth to a third of the
                positions with short answers); with a 49k vocabulary the skipped projection and its float32
                softmax are a large share of a step. Indices rather than a mask: no data-dependent shape inside.

        Returns:
            Logits ``(B, T, vocab_size)`` (``T = logits_to_keep`` when given); ``(K, vocab_size)`` with ``logits_at``.
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx or inputs_embeds")
        x = self.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if position_ids is None:
            position_ids = default_position_ids(input_pos, x.size(0), x.size(1), x.device)
        return self.decode(x, input_pos, position_ids, attn_mask, logits_to_keep, logits_at)

    def decode(
        self, x: torch.Tensor, input_pos: torch.Tensor | None, position_ids: torch.Tensor,
        attn_mask: torch.Tensor | None, logits_to_keep: int, logits_at: torch.Tensor | None,
    ) -> torch.Tensor:
        """``forward`` on embeddings ``x`` ``(B, T, n_embd)`` with ``position_ids`` filled in."""
        raise NotImplementedError

    def kv_cache_copy(self, length: int, rows: int = 1) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
        """A copy of the first ``rows`` rows' keys and values in the first ``length`` cache slots, per layer
        ``(k, v)`` each ``(rows, n_query_groups, length, head_size)`` (HF's legacy cache layout); ``None`` where
        this decoder's cache cannot be copied and loaded back (then generations never reuse a prompt prefix, and
        rows never join a running batch)."""
        return None

    def kv_cache_load(self, kv: tuple[tuple[torch.Tensor, torch.Tensor], ...], length: int) -> None:
        """Write the first ``length`` slots of ``kv`` (from ``kv_cache_copy``) into every row of a freshly set up
        cache, as if a prefill had just written them."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a copied KV cache")

    @property
    def kv_cache_joinable(self) -> bool:
        """Whether rows can join the cache now set up (``kv_cache_join``)."""
        return False

    def kv_cache_join(self, kv: tuple[tuple[torch.Tensor, torch.Tensor], ...], end: int, shift: int = 0) -> None:
        """Add rows to the running cache between two decode steps (continuous batching).

        Every row's slots first move by ``shift`` (keys and values do not depend on their slot: RoPE positions
        are per row), dropping ``-shift`` unused slots at the front or opening ``shift`` empty ones there; then
        rows whose keys and values ``kv`` (from ``kv_cache_copy``, ``(n, n_query_groups, L, head_size)`` per
        layer) fill slots ``[end - L, end)`` are appended, their other slots empty. The caller masks empty slots.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot add rows to a running KV cache")

    def kv_cache_stash(self) -> Any:
        """Take the KV cache out of the decoder (none is set up after), for ``kv_cache_restore``: a second cache
        can then be set up and used meanwhile, as a joining row's prefill does."""
        raise NotImplementedError(f"{type(self).__name__} cannot stash its KV cache")

    def kv_cache_restore(self, stashed: Any) -> None:
        """Put back a cache taken by ``kv_cache_stash``, dropping the one set up now."""
        raise NotImplementedError(f"{type(self).__name__} cannot stash its KV cache")


class Decoder(BaseDecoder):
    """The language model. ``forward`` returns logits; the loss belongs to the training code."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("decoder.vocab_size is not set: build the model with a tokenizer (vocab_size=len(tok))")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        cos, sin = build_rope_cache(config.block_size, config.head_size, config.rope_base)
        # Not persistent: derived from the config, so checkpoints stay portable across block sizes.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # Recompute each block's activations in backward instead of keeping them (HF's switch and name):
        # activation memory drops from every block's intermediates to one (B, T, C) input per block, for about
        # one extra forward pass of compute.
        self.gradient_checkpointing = False
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

    def gradient_checkpointing_enable(self) -> None:
        """Checkpoint every block while training (HF's name for the switch)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

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

    def kv_cache_select(self, rows: torch.Tensor) -> None:
        """Keep, repeat or reorder the cache's batch rows (see ``KVCache.select``)."""
        for block in self.h:
            block.attn.kv_cache.select(rows)

    def kv_cache_copy(self, length: int, rows: int = 1) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(
            (block.attn.kv_cache.k[:rows, :, :length].clone(), block.attn.kv_cache.v[:rows, :, :length].clone())
            for block in self.h
        )

    def kv_cache_load(self, kv: tuple[tuple[torch.Tensor, torch.Tensor], ...], length: int) -> None:
        for block, (k, v) in zip(self.h, kv, strict=True):
            cache = block.attn.kv_cache
            cache.k[:, :, :length] = k[:, :, :length]  # (B, ng, length, hs), row 0 broadcast to every row
            cache.v[:, :, :length] = v[:, :, :length]

    @property
    def kv_cache_joinable(self) -> bool:
        return self.h[0].attn.kv_cache is not None

    def kv_cache_join(self, kv: tuple[tuple[torch.Tensor, torch.Tensor], ...], end: int, shift: int = 0) -> None:
        for block, (k, v) in zip(self.h, kv, strict=True):
            block.attn.kv_cache.join(k, v, end, shift)

    def kv_cache_stash(self) -> tuple[KVCache | None, ...]:
        stashed = tuple(block.attn.kv_cache for block in self.h)
        self.clear_kv_cache()
        return stashed

    def kv_cache_restore(self, stashed: tuple[KVCache | None, ...]) -> None:
        for block, cache in zip(self.h, stashed, strict=True):
            block.attn.kv_cache = cache

    @property
    def kv_cache_length(self) -> int:
        cache = self.h[0].attn.kv_cache
        return 0 if cache is None else cache.k.size(2)

    def check_positions(self, position_ids: torch.Tensor) -> None:
        """Raise if a position is beyond the RoPE table (``block_size``)."""
        if int(position_ids.max()) >= self.config.block_size:
            raise ValueError(
                f"sequence position {int(position_ids.max())} is beyond decoder.block_size={self.config.block_size}"
            )

    def decode(
        self, x: torch.Tensor, input_pos: torch.Tensor | None, position_ids: torch.Tensor,
        attn_mask: torch.Tensor | None, logits_to_keep: int, logits_at: torch.Tensor | None,
    ) -> torch.Tensor:
        # x: (B, T, C)
        if input_pos is None and not torch.compiler.is_compiling():
            # Checked without a cache only: a cache is never larger than block_size (set_kv_cache checks), and a
            # per-step check would cost a device sync on every generated token. Compiled training checks eagerly.
            self.check_positions(position_ids)
        cos = self.cos[position_ids].unsqueeze(2).to(x.dtype)  # (B, T, 1, hs)
        sin = self.sin[position_ids].unsqueeze(2).to(x.dtype)
        if input_pos is not None and attn_mask is None:
            # Causal over cache slots: query at slot p sees slots 0..p, never the unwritten rest of the cache.
            all_valid = torch.ones(1, self.kv_cache_length, dtype=torch.bool, device=x.device)
            attn_mask = build_attention_mask(all_valid, input_pos)  # (1, 1, T, S)
        # Only when gradients will flow: in eval or under no_grad there is nothing to save memory on.
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.h:
            if recompute:
                # Non-reentrant: works with DDP, torch.compile and inputs that need no grad, and restores the RNG
                # state so dropout draws the same masks when the block is recomputed.
                x = checkpoint(block, x, cos, sin, attn_mask, input_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, input_pos)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if logits_at is not None:
            x = x.flatten(0, 1)[logits_at]  # (K, C)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab) or (K, vocab)
