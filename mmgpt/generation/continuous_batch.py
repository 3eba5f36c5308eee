"""``ContinuousBatch``: a decode that rows join and leave between steps (continuous batching).

``generate`` and ``stream_tokens`` decode one batch of prompts from its prefill to its last row's end, on this
class. A server's requests arrive while a batch decodes, each with its own ``max_tokens`` and stop strings, and
a client that may leave. Here:

* ``add`` prefills prompts and adds them to the running batch at a step boundary (``DecodeState.join``): from the
  next ``step`` on they decode with the others;
* ``step`` samples every running row's next token and says which rows it ended: an eos token, one of the row's
  stop strings, or its own ``max_new_tokens``;
* ``finish`` ends rows early for the caller (its client has gone, or it has what it wants).

A row that ends leaves: its KV cache row, positions and mask are dropped before the next step, so it costs nothing
after (with ``compile``, whose graphs are per batch size, it stays hidden until rows join). Greedy rows get
exactly the tokens they get alone, wherever they joined: each row keeps its own positions and mask, as a
left-padded row does. Sampled rows draw from the batch's one ``generator``, so their samples depend on the rows
beside them.

The decode settings (``GenerationConfig``: greedy or the sampling filters, repetition penalty,
``num_return_sequences``, eos) are the batch's; ``max_new_tokens`` and ``stop_strings`` may differ per prompt.
The KV cache has ``capacity`` slots for the whole decode; rows that join move the slots in use (the oldest row's
first token to slot 0), and ``fits`` says whether prompts fit now::

    with ContinuousBatch(model, GenerationConfig(eos_token_id=eos), capacity=block_size) as batch:
        batch.add(input_ids, attention_mask, image_embeds=embeds, max_new_tokens=[16, 48])
        while batch:
            rows, tokens, ended = batch.step()
            if batch.fits(prompt_len, max_new_tokens):
                batch.add(more_ids, more_mask, max_new_tokens=max_new_tokens)

Like a ``DecodeState``, an open batch holds its model from its first ``add`` to ``close`` (a ``with`` block closes
it). A batch that every row has left lets go of its cache at the next ``add``, which starts a new decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from mmgpt.generation.config import GenerationConfig
from mmgpt.generation.decode_state import DecodeState, join_slot
from mmgpt.generation.prefix_cache import PrefixCache
from mmgpt.generation.sampling import apply_repetition_penalty, sample
from mmgpt.generation.stopping import StopStrings
from mmgpt.models.mmgpt import MMGPT


class ContinuousBatch:
    """Rows decoding together, which prompts join and rows leave between steps (see the module docstring).

    Args:
        model: the model (in eval mode). Held from the first ``add`` until ``close``.
        config: how to decode: greedy or sampling with its filters, ``repetition_penalty``,
            ``num_return_sequences`` (rows per prompt, prefilled once), ``eos_token_id``, ``use_cache``,
            ``compile``; ``max_new_tokens`` and ``stop_strings`` are each prompt's default. No beam search.
        capacity: the KV cache's slots (at most ``decoder.block_size``). Default: the first prompts and their
            ``max_new_tokens`` exactly, which leaves no room for later prompts; a batch that others join needs more.
        generator: a seeded ``torch.Generator`` for sampling.
        tokenizer: reads the generated text for stop strings.
        prefix_cache: a ``PrefixCache`` for a decode that starts with one unpadded prompt (as ``generate``).
    """

    def __init__(
        self, model: MMGPT, config: GenerationConfig, *, capacity: int | None = None,
        generator: torch.Generator | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        if config.num_beams > 1:
            raise ValueError("a ContinuousBatch samples or decodes greedily: num_beams must be 1")
        self.model, self.config, self.capacity = model, config, capacity
        self.generator, self.tokenizer, self.prefix_cache = generator, tokenizer, prefix_cache
        self.eos = torch.tensor(config.eos_token_ids, dtype=torch.long)
        self._stops: dict[tuple[str, ...], StopStrings] = {}
        self.default_stops = self._stop_strings(config.stop_strings)  # checked now: they need the tokenizer
        self.state: DecodeState | None = None
        self.next_id = 0
        # Per row of the state, in its order: the id `add` gave it, the tokens it may still sample, and whether it
        # still runs (False once it ended or was finished; it leaves before the next step).
        self.rows = torch.empty(0, dtype=torch.long)
        self.left = torch.empty(0, dtype=torch.long)
        self.alive = torch.empty(0, dtype=torch.bool)
        self.live = 0  # how many rows run
        self.logits: torch.Tensor | None = None  # (b, V) every row's next-token logits, when its last token is fed
        self.pending: torch.Tensor | None = None  # (b,) the tokens `step` sampled, fed at the next step or add
        self.stops: dict[int, StopStrings] = {}  # the stop strings of the rows that have some, by row id
        self.history: dict[int, list[int]] = {}  # those rows' tokens so far
        self._room: tuple[int, int, int] | None = None  # see _join_slot

    def __len__(self) -> int:
        """The rows still running."""
        return self.live

    def _stop_strings(self, strings: Sequence[str] | None) -> StopStrings | None:
        if not strings:
            return None
        key = tuple(strings)
        if key not in self._stops:
            self._stops[key] = StopStrings(key, self.tokenizer)
        return self._stops[key]

    @torch.inference_mode()
    def add(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, images: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None, max_new_tokens: int | Sequence[int] | None = None,
        stop_strings: Sequence[Sequence[str] | None] | None = None,
    ) -> list[int]:
        """Prefill prompts and add them to the batch; they decode from the next ``step`` on.

        Into a running batch the prompts join (``DecodeState.join``); check ``fits`` first. Into a batch with no
        rows running they start a new decode, with a cache of ``capacity`` slots.

        Args:
            input_ids: ``(B, T)`` left-padded prompts.
            attention_mask: ``(B, T)``, 1 on real tokens; ``None`` = no padding.
            images: ``(N, 3, H, W)`` for the ``<image>`` placeholders in order, or ``image_embeds``
                ``(N, image_seq_len, n_embd)`` already encoded.
            max_new_tokens: the most tokens per row: one for every prompt, or one per prompt (default: the
                config's). Each at least 1.
            stop_strings: per prompt, the strings that end its rows (``None``: the config's).

        Returns:
            The ids of the new rows, ``num_return_sequences`` per prompt in prompt order (``step`` reports rows by
            id; ids count up from 0 over the batch's life).

        Raises:
            ValueError: prompts that do not fit (``fits``), or a ``max_new_tokens`` below 1.
        """
        B, T = input_ids.shape
        n = self.config.num_return_sequences
        if max_new_tokens is None:
            max_new_tokens = self.config.max_new_tokens
        limits = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != B or min(limits) < 1:
            raise ValueError(f"max_new_tokens must be one int >= 1 or one per prompt ({B}), got {max_new_tokens!r}")
        if stop_strings is not None and len(stop_strings) != B:
            raise ValueError(f"stop_strings must hold one entry per prompt ({B}), got {len(stop_strings)}")
        stops = [self.default_stops] * B if stop_strings is None else [self._stop_strings(s) for s in stop_strings]
        device = input_ids.device
        copies = torch.arange(B, device=device).repeat_interleave(n)  # rows per prompt, prefilled once
        self._flush()
        if self.live == 0:
            self.close()
            config = self.config
            self.state = DecodeState(
                self.model, input_ids, attention_mask, max(limits), config.use_cache, config.compile,
                track_seen=config.repetition_penalty != 1.0, prefix_cache=self.prefix_cache, capacity=self.capacity,
            )
            logits = self.state.prefill(images, image_embeds)
            if n > 1:
                self.state.select(copies)
                logits = logits[copies]
            self.rows = torch.empty(0, dtype=torch.long, device=device)
            self.left = torch.empty(0, dtype=torch.long, device=device)
            self.alive = torch.empty(0, dtype=torch.bool, device=device)
        else:
            if self._join_slot(T, max(limits)) is None:
                raise ValueError(
                    f"prompts of {T} tokens with up to {max(limits)} new tokens do not fit the running batch now "
                    "(see fits)"
                )
            if self.live < self.rows.numel():  # rows hidden under compile go now: the batch size changes anyway
                self._select(self.alive.nonzero().squeeze(1))
            slot = self._join_slot(T, max(limits))
            logits = self.state.join(input_ids, attention_mask, images, image_embeds, copies if n > 1 else None, slot)
            logits = torch.cat([self.logits, logits])
        ids = torch.arange(self.next_id, self.next_id + B * n, device=device)
        self.next_id += B * n
        self.rows = torch.cat([self.rows, ids])
        self.left = torch.cat([self.left, torch.tensor(limits, device=device)[copies]])
        self.alive = torch.cat([self.alive, torch.ones(B * n, dtype=torch.bool, device=device)])
        self.live += B * n
        self.logits, self._room = logits, None
        for row, k in zip(ids.tolist(), copies.tolist(), strict=True):
            if stops[k] is not None:
                self.stops[row], self.history[row] = stops[k], []
        return ids.tolist()

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        """Whether prompts left-padded to ``prompt_len`` tokens, with up to ``max_new_tokens`` each, can be
        ``add``-ed now: the running rows and theirs must fit the cache together (``decode_state.join_slot``), and
        rows can join this decode (the KV cache on, a decoder that can add rows). Into a batch with no rows
        running, prompts fit when they fit ``capacity`` (or the model's context). Runs nothing."""
        return self._join_slot(prompt_len, max_new_tokens) is not None

    def _join_slot(self, prompt_len: int, max_new_tokens: int) -> int | None:
        if self.live == 0:
            capacity = self.capacity or self.model.config.decoder.block_size
            return prompt_len if prompt_len + max_new_tokens <= capacity else None
        if self._room is None:  # what the running rows use, until they change (a server asks every step)
            if not self.state.joinable:
                return None
            live = self.alive.nonzero().squeeze(1)
            # The tokens sampled last are fed before a join: one slot further.
            pos = self.state.pos + int(self.pending is not None)
            self._room = (pos, int(self.state.start[live].min()), int(self.left[live].max()))
        pos, first, left = self._room
        return join_slot(pos, first, prompt_len, max(max_new_tokens, left), self.state.capacity)

    @torch.inference_mode()
    def finish(self, rows: Sequence[int]) -> None:
        """End rows early (by id): they leave before the next step, as rows that end by themselves do. Rows that
        have ended already are ignored."""
        if not rows or self.live == 0:
            return
        gone = torch.isin(self.rows, torch.as_tensor(list(rows), device=self.rows.device)) & self.alive
        self.alive &= ~gone
        self.live -= int(gone.sum())
        self._room = None
        for row in rows:
            self.stops.pop(row, None)
            self.history.pop(row, None)

    @torch.inference_mode()
    def step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample the next token of every running row.

        Returns:
            ``(rows, tokens, ended)``: the running rows' ids ``(b,)`` (in the order they were added), the token each
            appended, and whether that token ended the row (an eos token, which it keeps; one of its stop strings;
            its ``max_new_tokens``). Ended rows leave before the next step.
        """
        self._flush()
        if self.live == 0:
            raise RuntimeError("no rows are running: add prompts first")
        config = self.config
        logits = apply_repetition_penalty(self.logits, self.state.seen, config.repetition_penalty)
        tokens = sample(
            logits, config.do_sample, config.temperature, config.top_k, config.top_p, config.min_p, self.generator
        )  # (b,)
        self.left -= 1
        # Under compile, ended rows stay in the batch, hidden: only the running ones are reported.
        live = None if self.live == self.rows.numel() else self.alive.nonzero().squeeze(1)
        rows, out, left = (self.rows, tokens, self.left) if live is None else (
            self.rows[live], tokens[live], self.left[live]
        )
        ended = left <= 0
        if self.eos.numel():
            self.eos = self.eos.to(out.device)
            ended |= torch.isin(out, self.eos)
        if self.stops:
            hit = []
            for row, token in zip(rows.tolist(), out.tolist(), strict=True):
                history = self.history.get(row)
                if history is not None:
                    history.append(token)
                hit.append(history is not None and self.stops[row].hit(history))
            ended |= torch.tensor(hit, dtype=torch.bool, device=out.device)
        if bool(ended.any()):
            done = ended.nonzero().squeeze(1)
            self.alive[done if live is None else live[done]] = False
            self.live -= done.numel()
            for row in rows[done].tolist():
                self.stops.pop(row, None)
                self.history.pop(row, None)
        self.pending, self.logits, self._room = tokens, None, None
        return rows, out, ended

    def _flush(self) -> None:
        """Drop the rows that have left (unless compiled) and feed the sampled tokens of the rest, so that every
        row's logits are its newest token's: the point where prompts can join."""
        if self.state is None:
            return
        tokens, self.pending, self._room = self.pending, None, None
        if self.live == 0:
            return  # nothing left to decode: the next add starts afresh
        if not self.config.compile and self.live < self.rows.numel():
            keep = self.alive.nonzero().squeeze(1)
            self._select(keep)
            tokens = None if tokens is None else tokens[keep]
        if tokens is not None:
            self.logits = self.state.step(tokens)

    def _select(self, keep: torch.Tensor) -> None:
        self._room = None
        self.state.select(keep)
        self.rows, self.left, self.alive = self.rows[keep], self.left[keep], self.alive[keep]
        if self.logits is not None:
            self.logits = self.logits[keep]

    def close(self) -> None:
        """Free the model's KV cache and lock (a ``PrefixCache`` gets its snapshot then); rows still running end."""
        state, self.state = self.state, None
        self.live, self.pending, self.logits, self._room = 0, None, None, None
        self.stops.clear()
        self.history.clear()
        if state is not None:
            state.close()

    def __enter__(self) -> ContinuousBatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
