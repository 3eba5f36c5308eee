"""``DecodeState``: one left-padded batch being decoded — its prefill, then one KV-cached step per token.

Every row's last prompt token sits in the same cache slot, so one decode step serves all rows. Each row's RoPE
positions start at its first real token, and padding is masked out of attention, so a row generates exactly what
it would generate alone. Masks come from ``mmgpt.models.attention`` only, as in training
(``decoder.attention="prefix"`` included).

The KV cache is a buffer of the model's decoder, so a model decodes one batch at a time: a ``DecodeState`` holds
its model's lock from construction to ``close``, and every generation (``generate``, ``stream_tokens``, beam
search, and the ``Pipeline`` calls built on them) runs inside one. Threads sharing a model therefore take turns,
each getting exactly the tokens it would get alone.

Given a ``PrefixCache`` (``mmgpt.generation.prefix_cache``), a one-row state prefills only what follows the longest
cached prefix of its prompt, and on closing leaves a snapshot of its cache there for the next prompt.

Rows may also join between two steps (``join``: continuous batching). A joining prompt of ``L`` tokens is prefilled
alone, in a cache of its own, and its keys and values placed in the slots just before the shared slot, exactly
where a left-padded row of the batch would hold them, every earlier slot masked and its positions starting at 0 at
its first real token. Keys and values do not depend on their slot (the RoPE positions are per row), so a join may
move every row's slots when the cache lacks room (``join_slot``): the slots before the oldest row's first token
are dropped, or empty slots opened at the front for a prompt longer than the slots in use. A joining row thus
generates what it generates alone, as a left-padded row does.
"""

from __future__ import annotations

import threading
import types
import weakref

import torch

from mmgpt.generation.f32_gemm import fast_inference
from mmgpt.generation.prefix_cache import CachedPrefix, PrefixCache, image_starts, weights_key
from mmgpt.models.attention import build_attention_mask
from mmgpt.models.decoder import BaseDecoder
from mmgpt.models.mmgpt import MMGPT


class _ModelLock:
    """A lock on one model's KV cache that knows the thread holding it (and keeps the model's compiled step).

    A thread that asks for the lock it already holds is refused instead of waiting forever: it is an unfinished
    stream (a suspended generator holds the lock between tokens) followed by another generation in the same
    thread, which would otherwise deadlock. (An ``RLock`` would let the second generation in, and it would replace
    the cache the stream is still decoding with.)
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None
        # The model's compiled decode step, made on first use and kept: a new torch.compile wrapper per call
        # would cost its setup and guard checks on every generate call.
        self.compiled_step = None

    def acquire(self) -> None:
        if self.owner == threading.get_ident():
            raise RuntimeError(
                "this model is already generating in this thread: an unfinished stream() or stream_tokens() holds "
                "its KV cache. Exhaust or close() that iterator before starting another generation on the model"
            )
        self.lock.acquire()
        self.owner = threading.get_ident()

    def release(self) -> None:
        self.owner = None
        self.lock.release()


# The locks live here, keyed weakly by decoder, and not on the module: a threading.Lock attribute would make the
# model fail copy.deepcopy and pickling. A copy is a new key, with a lock (and a cache) of its own.
_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, _ModelLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(decoder: torch.nn.Module) -> _ModelLock:
    with _LOCKS_GUARD:  # two threads meeting a model for the first time must get the same lock
        lock = _LOCKS.get(decoder)
        if lock is None:
            lock = _LOCKS[decoder] = _ModelLock()
        return lock


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The same mask as an additive bias: SDPA would otherwise convert a boolean mask in every layer, every step.
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def join_slot(pos: int, first: int, prompt_len: int, need: int, capacity: int) -> int | None:
    """The slot where the next step writes after prompts join a batch (``DecodeState.join``), or ``None`` when they
    do not fit: the batch's next step writes slot ``pos``, its rows begin at slot ``first``, the prompts have
    ``prompt_len`` tokens (left-padded) and every row, theirs included, may then need ``need`` more slots.

    The slots stay where they are when the prompts fit before ``pos`` and every row after it (rows take the cache
    rows of those that left, and nothing is copied); otherwise they move so that the oldest row begins at slot 0,
    or the prompt if it is longer (a copy of the cache).
    """
    if prompt_len <= pos and pos + need <= capacity:
        return pos
    slot = max(prompt_len, pos - first)
    return slot if slot + need <= capacity else None


def _shifted(key_valid: torch.Tensor, shift: int) -> torch.Tensor:
    """``key_valid`` ``(B, S)`` with every slot moved by ``shift``: empty (False) slots opened at the front, or
    slots dropped there and unwritten (True: to be filled by later steps) ones added at the end."""
    if shift > 0:
        return torch.cat([key_valid.new_zeros(key_valid.size(0), shift), key_valid[:, :-shift]], dim=1)
    if shift < 0:
        return torch.cat([key_valid[:, -shift:], key_valid.new_ones(key_valid.size(0), -shift)], dim=1)
    return key_valid


def decode_step(
    decoder: torch.nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Feed ``tokens`` ``(b,)`` into cache slot ``input_pos``; ``mask`` ``(b, 1, 1, S')`` covers the first S'
    slots. Returns the next logits ``(b, V)``."""
    return decoder(tokens[:, None], input_pos=input_pos, position_ids=position_ids, attn_mask=mask)[:, -1]


def compile_decode_step():
    """``decode_step`` through ``torch.compile``, with graphs of its own: a copy of the function with its own code
    object. Dynamo keeps graphs per code object and falls back to eager, with a warning, past
    ``recompile_limit`` (8) of them; each model takes one or two (batch 1, and any other batch size), so one
    ``decode_step`` shared by every model compiled in a process would run eagerly from the fifth model or so."""
    step = types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__, decode_step.__name__)
    return torch.compile(step, dynamic=True)


class DecodeState:
    """A left-padded batch being decoded: per-row positions, masks and KV cache, kept in step.

    Building one checks and lays out the batch, then takes the model's lock; ``prefill`` runs the model over the
    prompts, ``step`` feeds one token per row, ``select(rows)`` keeps, repeats or reorders rows everywhere at once
    (finished rows leave), ``join`` adds prompts as rows between two steps, and ``close`` frees the cache and the
    lock (also on leaving a ``with`` block).

    Args:
        model: the model; its decoder holds the KV cache while this state is open, so one state per model at a
            time: building a second one waits until the first is closed, or raises ``RuntimeError`` in the thread
            that holds the first (waiting there could never end).
        input_ids: ``(B, T)`` left-padded prompts.
        attention_mask: ``(B, T)``, 1 on real tokens; ``None`` = no padding.
        max_new_tokens: the most tokens any row will generate (sizes the cache).
        capacity: the cache's slots (default ``T + max_new_tokens``, at most ``decoder.block_size``); more leaves
            room for rows that ``join`` later.
        use_cache: False re-runs the whole sequence each step (the reference path).
        compile: run the decode step through ``torch.compile``. Dynamic shapes: the attended slots grow by one per
            step and one graph serves every length (a static graph would attend to the whole cache, which costs
            more than the compile saves). The batch size stays static (the cache is a module buffer), so each
            batch size compiles once; the model keeps its compiled step for later calls.
        track_seen: keep which tokens each row has seen, for the repetition penalty.
        prefix_cache: reuse and keep prompt prefixes there (see ``prefill``). Used for one unpadded row with the
            KV cache on, causal attention and a decoder whose cache can be copied; ignored otherwise.
    """

    def __init__(
        self, model: MMGPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
        use_cache: bool = True, compile: bool = False, track_seen: bool = False,
        prefix_cache: PrefixCache | None = None, capacity: int | None = None,
    ) -> None:
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {(B, T)}")
        block_size = model.config.decoder.block_size
        S = T + max_new_tokens  # every slot this generation will fill
        if S > block_size:
            raise ValueError(
                f"prompt ({T} tokens, images included) + max_new_tokens ({max_new_tokens}) = {S} exceeds "
                f"decoder.block_size={block_size}; shorten the prompt or lower max_new_tokens"
            )
        if capacity is not None:
            if not S <= capacity <= block_size:
                raise ValueError(
                    f"capacity={capacity} must hold the prompt and max_new_tokens ({S}) and be at most "
                    f"decoder.block_size={block_size}"
                )
            S = capacity
        self.model, self.decoder, self.input_ids, self.T, self.use_cache = model, model.decoder, input_ids, T, use_cache
        self.compile, self.step_fn = compile, None  # the step function, made at the first step
        # Prefix-LM: the whole left-padded prompt (image included) ends at slot T in every row.
        self.prefix_end = T if model.config.decoder.attention == "prefix" else None
        self.slots = torch.arange(S, device=device)
        self.key_valid = torch.ones(B, S, dtype=torch.bool, device=device)  # (B, S): False on left padding
        self.key_valid[:, :T] = attention_mask.bool()
        self.start = T - attention_mask.sum(dim=1)  # (B,): each row's first real slot (after its left padding)
        self.position_ids = (self.slots[None, :] - self.start[:, None]).clamp(min=0)  # (B, S): real tokens from 0
        self.pos = T  # the slot the next step writes: every row's newest token goes there
        # The prompt's real tokens and the output so far, for the repetition penalty (padding is in no prompt).
        self.seen = None
        if track_seen:
            counts = torch.zeros(B, model.config.decoder.vocab_size, dtype=torch.long, device=device)
            self.seen = counts.scatter_add_(1, input_ids, attention_mask.long()) > 0  # (B, V)
        self.decode_mask = self.embeds = None
        # What prefill ran the model over: slots [prefilled_from, T) (0 unless a cached prefix was loaded).
        self.prefilled_from = 0
        # Slots holding finished keys and values (the prompt after prefill, then one more per step), and the
        # tokens fed after the prompt while the batch is the one prompt's row (None once it is not).
        self.written, self.fed = 0, []
        self.prefix_cache = prefix_cache if prefix_cache is not None and self._may_reuse(attention_mask) else None
        self.weights_key = weights_key(self.decoder, device) if self.prefix_cache is not None else None
        self.starts, self.image_embeds = (), None  # the prompt's image slots and embeddings, set by prefill
        # Last, after every check that can fail: from here on only close() lets go of the model.
        self.lock = _model_lock(self.decoder)
        self.lock.acquire()
        self.closed = False
        try:
            fast_inference(self.decoder, True)  # packed weights are kept from the last generation if unchanged
        except BaseException:
            self.close()
            raise

    def _may_reuse(self, attention_mask: torch.Tensor) -> bool:
        """Whether a cached prefix's keys and values are exactly what this prefill would compute: one row without
        padding (positions are slots), the KV cache on, causal attention (in a prefix-LM an earlier prompt token
        sees later ones, so a longer prompt changes its keys), and a decoder that can copy its cache."""
        return (
            self.use_cache and self.input_ids.size(0) == 1 and self.prefix_end is None
            and type(self.decoder).kv_cache_copy is not BaseDecoder.kv_cache_copy and bool(attention_mask.all())
        )

    def prefill(self, images: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompts (with their images) through the model; returns the next-token logits ``(B, V)``.

        With a ``prefix_cache``, the longest usable cached prefix of the prompt (same token ids, same images in
        the same slots, same weights) is loaded into the cache and only the slots after it are run, at their own
        positions; ``prefilled_from`` says where that began.

        Args:
            images: ``(N, 3, H, W)`` for the ``<image>`` placeholders in order, or ``image_embeds``
                ``(N, image_seq_len, n_embd)`` already encoded.
        """
        T = self.T
        if self.prefix_cache is not None and image_embeds is None and images is not None:
            image_embeds = self.model.encode_images(images)  # a cached prefix is matched on the embeddings
        x = self.model.embed(self.input_ids, images, image_embeds)  # (B, T, C)
        mask = build_attention_mask(self.key_valid[:, :T], self.slots[:T], self.prefix_end)  # (B, 1, T, T)
        if not self.use_cache:
            self.embeds = x  # the reference path re-runs the whole sequence every step
            return self.decoder(
                inputs_embeds=x, position_ids=self.position_ids[:, :T], attn_mask=mask, logits_to_keep=1
            )[:, -1]
        self.decoder.set_kv_cache(x.size(0), self.slots.numel(), device=x.device, dtype=x.dtype)
        # Every decode step's query is the newest token, which sees every valid slot written so far: one mask row
        # serves all steps, sliced to the slots in use.
        self.decode_mask = _additive(build_attention_mask(self.key_valid, self.slots[-1:]), x.dtype)
        P = self._load_prefix(image_embeds) if self.prefix_cache is not None else 0
        logits = self.decoder(
            inputs_embeds=x[:, P:], input_pos=self.slots[P:T], position_ids=self.position_ids[:, P:T],
            attn_mask=_additive(mask[:, :, P:], x.dtype), logits_to_keep=1,
        )[:, -1]  # (B, V)
        self.prefilled_from, self.written = P, T
        return logits

    def _load_prefix(self, image_embeds: torch.Tensor | None) -> int:
        """Load the longest usable cached prefix of the prompt into the fresh cache; returns its length (0: none)."""
        ids = self.input_ids[0].cpu()
        config = self.model.config
        self.starts = image_starts(ids, config.image_token_id, self.model.image_seq_len)
        self.image_embeds = image_embeds
        hit = self.prefix_cache.lookup(self.weights_key, ids, self.starts, image_embeds)
        if hit is None:
            return 0
        entry, P = hit
        self.decoder.kv_cache_load(entry.kv, P)
        return P

    def select(self, rows: torch.Tensor) -> None:
        """Keep / repeat / reorder batch rows (``rows`` index the current rows)."""
        if rows.numel() != 1:
            self.fed = None  # the rows now hold several continuations: only the prompt is common to them
        self.key_valid, self.position_ids, self.start = self.key_valid[rows], self.position_ids[rows], self.start[rows]
        if self.seen is not None:
            self.seen = self.seen[rows]
        if self.use_cache:
            self.decoder.kv_cache_select(rows)
            self.decode_mask = self.decode_mask[rows]
        else:
            self.embeds = self.embeds[rows]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row's next token ``(b,)`` into slot ``pos`` and return the next logits ``(b, V)``."""
        # A stream may be resumed from another thread (a web server's worker pool): the lock's owner is the thread
        # decoding now, so the thread that started it can run other generations, which then wait their turn.
        self.lock.owner = threading.get_ident()
        if self.seen is not None:
            self.seen[torch.arange(tokens.size(0), device=tokens.device), tokens] = True
        pos = self.pos
        self.pos = pos + 1
        if not self.use_cache:
            self.embeds = torch.cat([self.embeds, self.decoder.wte(tokens[:, None])], dim=1)  # (b, pos + 1, C)
            mask = build_attention_mask(self.key_valid[:, : pos + 1], self.slots[: pos + 1], self.prefix_end)
            return self.decoder(
                inputs_embeds=self.embeds, position_ids=self.position_ids[:, : pos + 1], attn_mask=mask,
                logits_to_keep=1,
            )[:, -1]
        if self.step_fn is None:
            if self.compile and self.lock.compiled_step is None:
                self.lock.compiled_step = compile_decode_step()
            self.step_fn = self.lock.compiled_step if self.compile else decode_step
        logits = self.step_fn(
            self.decoder, tokens, self.slots[pos : pos + 1], self.position_ids[:, pos : pos + 1],
            self.decode_mask[..., : pos + 1],
        )
        if self.fed is not None and self.written == pos:
            self.fed.append(tokens[:1])  # a tensor: reading its value would wait for the device every step
            self.written = pos + 1
        return logits

    @property
    def joinable(self) -> bool:
        """Whether rows can ``join``: the KV cache on, and a decoder that can add rows to it (the native one;
        HF's ``DynamicCache`` of plain full-attention layers)."""
        return self.use_cache and not self.closed and self.decode_mask is not None and self.decoder.kv_cache_joinable

    @property
    def capacity(self) -> int:
        return self.slots.numel()

    @property
    def first_slot(self) -> int:
        """The first slot any row uses (its first real token); ``pos`` when there are no rows."""
        return int(self.start.min()) if self.start.numel() else self.pos

    def join(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, images: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None, copies: torch.Tensor | None = None, slot: int | None = None,
    ) -> torch.Tensor:
        """Add prompts as new rows, last, between two steps; returns their next-token logits ``(n, V)``.

        Call it when every row's logits are those of its newest token (after ``prefill`` or ``step``): the new rows'
        first tokens then go into slot ``pos`` with everyone's next one. Their prompts, left-padded to ``L`` tokens,
        are prefilled alone in a cache of their own and placed at slots ``[s - L, s)``; the running rows' slots
        move by ``s - pos`` (see the module docstring), so that ``pos`` becomes ``s``. Their repetition-penalty
        history is their prompt's. A state that rows joined keeps no prompt prefix (its slots have moved).

        Args:
            input_ids: ``(n, L)`` left-padded prompts.
            attention_mask: ``(n, L)``, 1 on real tokens; ``None`` = no padding.
            images, image_embeds: as ``prefill``, for these prompts' ``<image>`` placeholders.
            copies: ``(k,)`` indices into the ``n`` prompts: the rows to add (a prompt repeated for several
                samples is prefilled once), as ``select``; default one row per prompt.
            slot: ``s``, from ``join_slot`` (which checks that every row fits the cache after it); default: the
                slots move so that the oldest row's first token, or the longer prompt's, is at slot 0.

        Raises:
            RuntimeError: the state cannot take rows (``joinable`` is False).
            ValueError: ``slot`` cannot hold the prompts before it or the running rows' slots.
        """
        if not self.joinable:
            raise RuntimeError(
                "rows cannot join this decode: it needs the KV cache on and a decoder that can add rows to it"
            )
        self.lock.owner = threading.get_ident()  # as in step: the decode may be driven from another thread now
        n, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        S, used = self.capacity, self.pos - self.first_slot
        s = max(L, used) if slot is None else slot
        if not max(L, used) <= s <= S:
            raise ValueError(
                f"prompts of {L} tokens cannot join at slot {s}: the running rows use {used} slots before the next "
                f"one, and the cache has {S}"
            )
        shift = s - self.pos
        local = self.slots[:L]
        valid = attention_mask.bool()  # (n, L)
        pad = L - attention_mask.sum(dim=1)  # (n,)
        position_ids = (local[None, :] - pad[:, None]).clamp(min=0)  # (n, L)
        x = self.model.embed(input_ids, images, image_embeds)  # (n, L, C)
        mask = _additive(build_attention_mask(valid, local, L if self.prefix_end is not None else None), x.dtype)
        # The new rows' prefill runs in a cache of L slots of its own; the running cache waits aside meanwhile.
        running = self.decoder.kv_cache_stash()
        try:
            self.decoder.set_kv_cache(n, L, device=x.device, dtype=x.dtype)
            logits = self.decoder(
                inputs_embeds=x, input_pos=local, position_ids=position_ids, attn_mask=mask, logits_to_keep=1
            )[:, -1]  # (n, V)
            kv = self.decoder.kv_cache_copy(L, rows=n)
        finally:
            self.decoder.kv_cache_restore(running)
        seen = None
        if self.seen is not None:
            counts = torch.zeros(n, self.seen.size(1), dtype=torch.long, device=input_ids.device)
            seen = counts.scatter_add_(1, input_ids, attention_mask.long()) > 0  # (n, V)
        if copies is not None:
            kv = tuple((k[copies], v[copies]) for k, v in kv)
            logits, valid, pad = logits[copies], valid[copies], pad[copies]
            seen = None if seen is None else seen[copies]
        self.decoder.kv_cache_join(kv, s, shift)
        # The layout follows the cache: the running rows' slots move by `shift`, the new rows come last.
        new_valid = torch.ones(valid.size(0), S, dtype=torch.bool, device=valid.device)
        new_valid[:, : s - L] = False
        new_valid[:, s - L : s] = valid
        self.key_valid = torch.cat([_shifted(self.key_valid, shift), new_valid])
        self.start = torch.cat([self.start + shift, s - L + pad])
        self.position_ids = (self.slots[None, :] - self.start[:, None]).clamp(min=0)
        if seen is not None:
            self.seen = torch.cat([self.seen, seen])
        self.decode_mask = _additive(build_attention_mask(self.key_valid, self.slots[-1:]), self.decode_mask.dtype)
        self.pos = s
        # Row 0's prompt no longer starts at slot 0, nor is it alone: there is no prefix to leave for a next prompt.
        self.fed, self.prefix_cache = None, None
        return logits

    def _store_prefix(self) -> None:
        """Leave row 0's finished slots in the prefix cache: the prompt, and the tokens fed after it while the
        batch was that one row (with several samples per prompt, their common prompt only)."""
        fed = self.fed or []
        kv = self.decoder.kv_cache_copy(self.T + len(fed))
        if kv is None:
            return
        ids = self.input_ids[0].cpu()
        if fed:
            ids = torch.cat([ids, torch.cat(fed).cpu()])
        embeds = None if self.image_embeds is None else self.image_embeds.detach().clone()
        self.prefix_cache.store(CachedPrefix(self.weights_key, ids, self.T, self.starts, embeds, kv))

    def close(self) -> None:
        if self.closed:  # a with block after an explicit close(), or a generator closed twice
            return
        self.closed = True
        try:
            fast_inference(self.decoder, False)
            if self.use_cache:
                try:
                    if self.prefix_cache is not None and self.written:
                        self._store_prefix()
                finally:
                    self.decoder.clear_kv_cache()
        finally:
            self.lock.release()

    def __enter__(self) -> DecodeState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
