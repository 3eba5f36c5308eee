"""Autoregressive generation: one prefill over image + prompt, then one KV-cached step per token.

Batches are left-padded: every row's last prompt token sits in the same cache slot, so one decode step serves
all rows. Each row's RoPE positions start at its first real token, and padding is masked out of attention, so a
row generates exactly what it would generate alone. Masks come from ``build_attention_mask`` only, the
function training uses too (``decoder.attention="prefix"`` included).

Three ways to decode, with HF ``generate``'s argument names and defaults where they overlap:

* greedy (the default) and sampling (``do_sample=True``: ``temperature``, ``top_k``, ``top_p``, ``min_p``),
  both with ``repetition_penalty`` and ``num_return_sequences``;
* beam search (``num_beams > 1``: ``length_penalty``, ``early_stopping``), HF's algorithm;
* ``stream_tokens``: the same steps as greedy/sampling, yielded one token at a time.

A row stops at an ``eos_token_id`` (one id or several) or at a stop string, and then leaves the batch: the
KV cache, the positions and the mask drop it, so finished rows cost nothing in later steps. Several prompts about
one image take ``image_embeds`` (``model.encode_images``) to encode it once; ``num_return_sequences`` and beams
prefill a prompt once and copy its cache. ``compile=True`` runs the decode step through ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from mmgpt.models.decoder import Decoder, build_attention_mask
from mmgpt.models.mmgpt import MMGPT

__all__ = [
    "apply_repetition_penalty", "build_attention_mask", "cut_at_stop_string", "generate", "sample", "stream_tokens",
    "warp_logits",
]


def warp_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 1.0,
    min_p: float | None = None,
) -> torch.Tensor:
    """The sampling filters in HF's order (temperature, top-k, top-p, min-p); removed tokens get ``-inf``.

    Args:
        logits: ``(B, V)`` next-token logits.
        temperature: divides the logits; lower is more deterministic.
        top_k: keep only the k most likely tokens (50 as HF; ``None`` or 0 keeps all).
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling).
        min_p: keep tokens at least ``min_p`` times as likely as the most likely one.

    Returns:
        ``(B, V)`` float32 logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass *before* it already reaches top_p; the most likely token always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 1.0,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token for each row.

    Args:
        logits: ``(B, V)`` next-token logits.
        do_sample: False picks the argmax (greedy), as HF ``generate``'s default; the filters then do nothing.
        temperature, top_k, top_p, min_p: see ``warp_logits``.
        generator: a seeded ``torch.Generator`` for reproducible sampling.

    Returns:
        ``(B,)`` token ids.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """HF's (CTRL's) repetition penalty: a token already in the sequence gets its score divided by ``penalty``
    when positive and multiplied by it when negative, so ``penalty > 1`` always makes it less likely.

    Args:
        logits: ``(B, V)``.
        seen: ``(B, V)`` bool, True for tokens in the row's prompt (padding excluded) or its output so far.
        penalty: 1.0 disables it.
    """
    if penalty == 1.0 or seen is None:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def cut_at_stop_string(text: str, stop_strings: Sequence[str] | None) -> tuple[str, bool]:
    """The text before the earliest stop string (which is not returned), and whether one was found."""
    ends = [i for i in (text.find(s) for s in stop_strings or ()) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


class _StopStrings:
    """Tells whether a row's newest token completed a stop string."""

    def __init__(self, stop_strings: Sequence[str], tokenizer: PreTrainedTokenizerBase | None) -> None:
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer to read the generated text: pass tokenizer=...")
        if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop_strings must be a list of non-empty strings, got {stop_strings!r}")
        self.strings, self.tokenizer = list(stop_strings), tokenizer
        # Only the tail is decoded: a token is at least one byte, so the last `window` tokens hold any stop
        # string that ends in the newest one, plus a character cut at the window's start.
        self.window = max(len(s.encode()) for s in self.strings) + 4

    def hit(self, ids: torch.Tensor) -> bool:
        tail = self.tokenizer.decode(ids[-self.window :].tolist(), skip_special_tokens=True)
        return any(s in tail for s in self.strings)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The same mask as an additive bias: SDPA would otherwise convert a boolean mask in every layer, every step.
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _decode_step(
    decoder: Decoder, tokens: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    # tokens: (b,) fed into slot input_pos; mask (b, 1, 1, S'): the first S' slots. Returns logits (b, V).
    return decoder(tokens[:, None], input_pos=input_pos, position_ids=position_ids, attn_mask=mask)[:, -1]


_compiled_decode_step = None


def _compiled_step():
    # Dynamic shapes: the attended slots grow by one per step and one graph serves every length (a static graph
    # would attend to the whole block_size cache, which costs more than the compile saves). The batch size stays
    # static (the cache is a module buffer), so each batch size compiles once.
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(_decode_step, dynamic=True)
    return _compiled_decode_step


class _Batch:
    """A left-padded batch being decoded: its prefill, then per-row positions, masks and KV cache kept in step.

    ``select(rows)`` keeps, repeats or reorders rows everywhere at once; the decode loops only call ``step``.
    """

    def __init__(
        self, model: MMGPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None, max_new_tokens: int, use_cache: bool = True, compile: bool = False,
        track_seen: bool = False,
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
        self.decoder, self.T, self.use_cache = model.decoder, T, use_cache
        self.step_fn = _compiled_step() if compile else _decode_step
        # Prefix-LM: the whole left-padded prompt (image included) ends at slot T in every row.
        self.prefix_end = T if model.config.decoder.attention == "prefix" else None
        self.slots = torch.arange(S, device=device)
        self.key_valid = torch.ones(B, S, dtype=torch.bool, device=device)  # (B, S): False on left padding
        self.key_valid[:, :T] = attention_mask.bool()
        pad_len = T - attention_mask.sum(dim=1)  # (B,)
        self.position_ids = (self.slots[None, :] - pad_len[:, None]).clamp(min=0)  # (B, S): real tokens from 0
        # The prompt's real tokens and the output so far, for the repetition penalty (padding is in no prompt).
        self.seen = None
        if track_seen:
            counts = torch.zeros(B, model.config.decoder.vocab_size, dtype=torch.long, device=device)
            self.seen = counts.scatter_add_(1, input_ids, attention_mask.long()) > 0  # (B, V)

        x = model.embed(input_ids, image_embeds=image_embeds)  # (B, T, C)
        mask = build_attention_mask(self.key_valid[:, :T], self.slots[:T], self.prefix_end)  # (B, 1, T, T)
        if use_cache:
            self.decoder.set_kv_cache(B, S, device=device, dtype=x.dtype)
            self.logits = self.decoder(
                inputs_embeds=x, input_pos=self.slots[:T], position_ids=self.position_ids[:, :T],
                attn_mask=_additive(mask, x.dtype), logits_to_keep=1,
            )[:, -1]  # (B, V)
            # Every decode step's query is the newest token, which sees every valid slot written so far: one
            # mask row serves all steps, sliced to the slots in use.
            self.decode_mask = _additive(build_attention_mask(self.key_valid, self.slots[-1:]), x.dtype)
        else:
            self.embeds = x  # the reference path re-runs the whole sequence every step
            self.logits = self.decoder(
                inputs_embeds=x, position_ids=self.position_ids[:, :T], attn_mask=mask, logits_to_keep=1
            )[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep / repeat / reorder batch rows (``rows`` index the current rows)."""
        self.key_valid, self.position_ids = self.key_valid[rows], self.position_ids[rows]
        self.logits = self.logits[rows]
        if self.seen is not None:
            self.seen = self.seen[rows]
        if self.use_cache:
            self.decoder.kv_cache_select(rows)
            self.decode_mask = self.decode_mask[rows]
        else:
            self.embeds = self.embeds[rows]

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed token ``step`` (0-based, ``(b,)``) and return the next logits ``(b, V)``."""
        if self.seen is not None:
            self.seen[torch.arange(tokens.size(0), device=tokens.device), tokens] = True
        pos = self.T + step
        if not self.use_cache:
            self.embeds = torch.cat([self.embeds, self.decoder.wte(tokens[:, None])], dim=1)  # (b, pos + 1, C)
            seen_slots = self.slots[: pos + 1]
            mask = build_attention_mask(self.key_valid[:, : pos + 1], seen_slots, self.prefix_end)
            return self.decoder(
                inputs_embeds=self.embeds, position_ids=self.position_ids[:, : pos + 1], attn_mask=mask,
                logits_to_keep=1,
            )[:, -1]
        return self.step_fn(
            self.decoder, tokens, self.slots[pos : pos + 1], self.position_ids[:, pos : pos + 1],
            self.decode_mask[..., : pos + 1],
        )

    def close(self) -> None:
        if self.use_cache:
            self.decoder.clear_kv_cache()


def _eos_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


@torch.inference_mode()
def stream_tokens(
    model: MMGPT,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    *,
    image_embeds: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 1.0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    stop_strings: Sequence[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy or sampled decoding, one step at a time; ``generate`` collects these steps.

    Args: as ``generate`` (no beam search: its best sequence is only known at the end).

    Yields:
        Per step, ``(rows, tokens)``: the output rows (of ``B * num_return_sequences``, grouped per prompt)
        still running, and the token each appended. A row that emits an eos token or completes a stop string
        yields that token last.
    """
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if num_return_sequences > 1 and not do_sample:
        # HF rejects this too: greedy decoding would return the same sequence n times.
        raise ValueError("num_return_sequences > 1 needs do_sample=True (or num_beams >= num_return_sequences)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    eos = torch.tensor(_eos_list(eos_token_id), dtype=torch.long, device=input_ids.device)
    stops = _StopStrings(stop_strings, tokenizer) if stop_strings else None
    if image_embeds is None and images is not None:
        image_embeds = model.encode_images(images)
    if max_new_tokens == 0:
        return
    state = _Batch(
        model, input_ids, attention_mask, image_embeds, max_new_tokens, use_cache, compile,
        track_seen=repetition_penalty != 1.0,
    )
    try:
        # One prefill per prompt; its cache is then copied to the prompt's num_return_sequences rows.
        rows = torch.arange(input_ids.size(0), device=input_ids.device).repeat_interleave(num_return_sequences)
        if num_return_sequences > 1:
            state.select(rows)
            rows = torch.arange(rows.numel(), device=rows.device)
        history = torch.zeros(rows.numel(), max_new_tokens, dtype=torch.long, device=rows.device) if stops else None
        logits = state.logits
        # Eager steps drop finished rows from the batch. A compiled step keeps them, since every batch size is a
        # graph of its own, and `alive` (None: all rows) hides them instead.
        alive = None
        for step in range(max_new_tokens):
            logits = apply_repetition_penalty(logits, state.seen, repetition_penalty)
            tokens = sample(logits, do_sample, temperature, top_k, top_p, min_p, generator)  # (b,)
            live_rows, live_tokens = (rows, tokens) if alive is None else (rows[alive], tokens[alive])
            yield live_rows, live_tokens
            if step == max_new_tokens - 1:
                break
            finished = torch.isin(live_tokens, eos) if eos.numel() else None
            if stops is not None:
                history[live_rows, step] = live_tokens
                hit = [stops.hit(history[r, : step + 1]) for r in live_rows.tolist()]
                hit = torch.tensor(hit, dtype=torch.bool, device=tokens.device)
                finished = hit if finished is None else finished | hit
            if finished is not None and bool(finished.any()):
                if compile:
                    alive = torch.ones_like(rows, dtype=torch.bool) if alive is None else alive.clone()
                    alive[alive.nonzero().squeeze(1)[finished]] = False
                    if not bool(alive.any()):
                        break
                else:
                    # Finished rows leave the batch: the cache, positions and mask drop them, so they cost nothing.
                    keep = (~finished).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        break
                    rows, tokens = rows[keep], tokens[keep]
                    state.select(keep)
            logits = state.step(tokens, step)
    finally:
        state.close()


@torch.inference_mode()
def generate(
    model: MMGPT,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    *,
    image_embeds: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 1.0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    stop_strings: Sequence[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> torch.Tensor:
    """Generate continuations for a left-padded batch.

    Args:
        model: the model (put it in eval mode first). One generation at a time: the KV cache lives in it.
        input_ids: ``(B, T)`` prompts, left-padded.
        attention_mask: ``(B, T)``, 1 on real tokens, 0 on padding; ``None`` = no padding.
        images: ``(N, 3, H, W)`` for the ``<image>`` placeholders, in order; or ``image_embeds``
            ``(N, image_seq_len, n_embd)`` from ``model.encode_images``, to encode an image once for many
            prompts.
        max_new_tokens: how many tokens to generate at most.
        eos_token_id: one id or a list; a row stops after emitting one. Later positions hold ``pad_token_id``.
        do_sample, temperature, top_k, top_p, min_p, generator: see ``sample``.
        repetition_penalty: see ``apply_repetition_penalty``.
        num_return_sequences: sequences per prompt (rows ``i * n ... i * n + n - 1`` belong to prompt ``i``);
            needs sampling or beam search. The prompt is prefilled once and its cache copied.
        num_beams: > 1 runs beam search (HF's algorithm; greedy choice within it, no sampling).
        length_penalty: beam search ranks a finished sequence by ``sum(log p) / length ** length_penalty``;
            > 0 favours longer sequences, < 0 shorter ones.
        early_stopping: beam search stops a prompt when ``num_beams`` sequences are finished (True), when a
            heuristic says no better one can come (False, HF's default), or when none can ("never": exact).
        stop_strings: a row stops once its text contains one (needs ``tokenizer``). The ids returned still
            hold it; ``cut_at_stop_string`` removes it from the text.
        tokenizer: decodes the output for ``stop_strings``.
        use_cache: False re-runs the full sequence each step (slow; the reference the cache is tested against).
        compile: ``torch.compile`` the decode step. One graph serves every step and length; each batch size
            compiles once (seconds to a minute), and finished rows stay in the batch instead of leaving it.

    Returns:
        ``(B * num_return_sequences, max_new_tokens)`` new token ids (``pad_token_id`` after a row's end).
    """
    if image_embeds is None and images is not None:
        image_embeds = model.encode_images(images)
    if num_beams > 1:
        if do_sample:
            raise ValueError("num_beams > 1 with do_sample=True (beam sampling) is not supported; choose one")
        if stop_strings:
            raise ValueError("stop_strings are not supported with beam search; use eos_token_id")
        if not use_cache:
            raise ValueError("beam search needs the KV cache (use_cache=True)")
        return _beam_search(
            model, input_ids, attention_mask, image_embeds, max_new_tokens=max_new_tokens, num_beams=num_beams,
            length_penalty=length_penalty, early_stopping=early_stopping,
            num_return_sequences=num_return_sequences, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            repetition_penalty=repetition_penalty, compile=compile,
        )
    B = input_ids.size(0)
    out = torch.full((B * num_return_sequences, max_new_tokens), pad_token_id, dtype=torch.long,
                     device=input_ids.device)
    steps = stream_tokens(
        model, input_ids, attention_mask, image_embeds=image_embeds, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences,
        stop_strings=stop_strings, tokenizer=tokenizer, generator=generator, use_cache=use_cache,
        compile=compile,
    )
    for step, (rows, tokens) in enumerate(steps):
        out[rows, step] = tokens
    return out


def _beam_search(
    model: MMGPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_embeds: torch.Tensor | None,
    *, max_new_tokens: int, num_beams: int, length_penalty: float, early_stopping: bool | str,
    num_return_sequences: int, eos_token_id: int | Sequence[int] | None, pad_token_id: int,
    repetition_penalty: float, compile: bool,
) -> torch.Tensor:
    """HF's vectorized beam search (transformers ``GenerationMixin._beam_search``), on the static KV cache.

    Per prompt, ``num_beams`` running sequences and the ``num_beams`` best finished ones. Each step takes the
    top ``K = max(2, 1 + n_eos) * num_beams`` continuations of all running beams by summed log-probability;
    those among the first ``num_beams`` that end (eos, or the length limit) become finished candidates scored
    ``sum_logprobs / generated_length ** length_penalty``; the best unfinished ones run on.
    """
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be between 1 and num_beams={num_beams}")
    B, N, nb = input_ids.size(0), max_new_tokens, num_beams
    device = input_ids.device
    if N == 0:
        return torch.empty(B * num_return_sequences, 0, dtype=torch.long, device=device)
    state = _Batch(
        model, input_ids, attention_mask, image_embeds, N, compile=compile, track_seen=repetition_penalty != 1.0
    )
    try:
        V = state.logits.size(-1)
        eos = torch.tensor(_eos_list(eos_token_id), dtype=torch.long, device=device)
        K = min(max(2, 1 + eos.numel()) * nb, nb * V)
        top_nb = torch.arange(K, device=device) < nb  # (K,): only these candidates may finish
        offsets = torch.arange(B, device=device)[:, None] * nb  # (B, 1): first row of each prompt's beams
        state.select(torch.arange(B, device=device).repeat_interleave(nb))  # one prefill, nb copies
        NEG = -1.0e9  # HF's "impossible" score; -inf would turn into NaN in the sums below
        # Only beam 0 starts live, so the first step does not pick the same token nb times.
        running_scores = torch.zeros(B, nb, device=device)
        running_scores[:, 1:] = NEG
        running = torch.full((B, nb, N), pad_token_id, dtype=torch.long, device=device)
        finished = running.clone()
        finished_scores = torch.full((B, nb), NEG, device=device)
        is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
        may_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
        logits = state.logits  # (B * nb, V)
        for step in range(N):
            logp = F.log_softmax(logits.float(), dim=-1)
            logp = apply_repetition_penalty(logp, state.seen, repetition_penalty)
            scores = (logp.view(B, nb, V) + running_scores[..., None]).view(B, nb * V)
            top_scores, top_index = scores.topk(K, dim=-1)  # (B, K)
            parent, token = top_index // V, top_index % V
            candidates = running.gather(1, parent[..., None].expand(B, K, N)).clone()  # (B, K, N)
            candidates[:, :, step] = token
            ends = torch.isin(token, eos) | (step == N - 1)  # (B, K): eos, or the length limit
            # The best num_beams candidates that did not end run on.
            live_scores = top_scores + ends.float() * NEG
            keep = live_scores.topk(nb, dim=-1).indices  # (B, nb)
            running = candidates.gather(1, keep[..., None].expand(B, nb, N))
            running_scores = live_scores.gather(1, keep)
            parent = parent.gather(1, keep)
            # Ended candidates among the top num_beams compete with the finished ones, length-normalized.
            new_finished = ends & top_nb
            normalized = top_scores / (step + 1) ** length_penalty
            full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
            normalized = normalized + (full | ~may_improve | ~new_finished).float() * NEG
            merged_scores = torch.cat([finished_scores, normalized], dim=1)  # (B, nb + K)
            best = merged_scores.topk(nb, dim=-1).indices
            finished = torch.cat([finished, candidates], dim=1).gather(1, best[..., None].expand(B, nb, N))
            finished_scores = merged_scores.gather(1, best)
            is_finished = torch.cat([is_finished, new_finished], dim=1).gather(1, best)
            # Can a running beam still beat the worst finished one? "never" bounds it exactly: with a positive
            # length_penalty the best case is the longest sequence, otherwise the current length.
            best_length = N if (early_stopping == "never" and length_penalty > 0) else step + 1
            best_running = running_scores[:, :1] / best_length**length_penalty
            worst = torch.where(is_finished, finished_scores.min(dim=-1, keepdim=True).values, NEG)
            may_improve &= (best_running > worst).any(dim=-1, keepdim=True)
            if (
                not bool(may_improve.any())
                or (early_stopping is True and bool(is_finished.all()))
                or bool(ends.all())
            ):
                break
            # Each beam continues from its parent's cache row.
            state.select((parent + offsets).flatten())
            logits = state.step(running[:, :, step].flatten(), step)
        return finished[:, :num_return_sequences].reshape(B * num_return_sequences, N)
    finally:
        state.close()
