"""Dynamic batching: one worker thread decodes the requests that arrive together as one left-padded batch.

The model holds one KV cache, so it decodes one batch at a time (``mmgpt.generation.decode_state``); a thread per
request would only take turns. Instead every request is queued, and the worker takes the oldest one together with
every queued request that can share its decode:

* the same sampling settings (greedy with greedy; sampling with the same temperature, top_p, top_k, min_p,
  repetition penalty and ``n``), since the engine applies one ``GenerationConfig`` to the whole batch;
* not seeded: a request with ``seed`` is decoded alone, so that its sample depends on the seed only, not on which
  other requests shared its random stream;
* prompts and ``max_tokens`` that fit the context together: the batch is left-padded to its longest prompt and
  sized for its largest ``max_tokens``;
* at most ``max_batch_size`` output rows (``n`` rows for a request with ``n`` samples).

``max_tokens`` may differ within a batch: the batch decodes to the largest, and a row stops being sent at its own
limit. Rows that end (eos, a stop string) leave the engine's batch and cost nothing after; a row past its own
``max_tokens``, or whose client has gone, is still decoded (the engine has no way to drop a row from outside) but
its tokens are dropped, and the batch ends as soon as no row is wanted. The batch is fixed once its prefill starts:
a request arriving during a decode waits for the next batch (no continuous batching). Greedy rows get exactly the
tokens they get alone: mmgpt's left padding gives every row its own positions and mask.

Results go back through each request's ``sink``, a callable the worker thread calls with ``Step``, ``Done`` and
``Failed`` events (``mmgpt.serve.app`` passes one that hands them to the event loop).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmgpt.generation.config import GenerationConfig
from mmgpt.generation.engine import stream_tokens
from mmgpt.generation.stopping import cut_at_stop_string
from mmgpt.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How a request decodes; requests with equal ``Sampling`` can share a batch (``key``)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1  # rows the engine decodes for the request (its n when sampling, else 1)
    seed: int | None = None

    def config(self, max_new_tokens: int, base: GenerationConfig, stop_strings: list[str] | None):
        """The ``GenerationConfig`` of a batch: these settings, eos and pad from ``base`` (the pipeline's)."""
        return GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            num_return_sequences=self.num_return_sequences, eos_token_id=base.eos_token_id,
            pad_token_id=base.pad_token_id, stop_strings=stop_strings,
        )


@dataclass
class Step:
    """What one decode step wrote for a request: text per choice index, and the choices that ended, with why
    (``"stop"``: eos or a stop string; ``"length"``: ``max_tokens``)."""

    pieces: dict[int, str] = field(default_factory=dict)
    finished: dict[int, str] = field(default_factory=dict)


@dataclass
class Done:
    """The request is complete: ``completion_tokens`` over all its choices (eos included, as it was generated)."""

    completion_tokens: int


@dataclass
class Failed:
    error: BaseException


Event = Step | Done | Failed
_ids = itertools.count()


@dataclass(eq=False)  # identity: a job is a dict key and is removed from the queue by identity
class Job:
    """One chat completion request, ready to decode.

    Args:
        conversation: messages as ``Pipeline.encode_chat`` takes them (images as PIL images).
        prompt_tokens: the prompt's length in tokens, images included.
        max_tokens: the most tokens per choice.
        n: choices to return; a greedy request decodes one row and repeats it.
        sampling: the decode settings.
        stop: stop strings (cut from the text; not returned).
        sink: called from the worker thread with each event; must not block.
    """

    conversation: Sequence[dict[str, Any]]
    prompt_tokens: int
    max_tokens: int
    sampling: Sampling
    sink: Callable[[Event], None]
    n: int = 1
    stop: list[str] | None = None
    cancelled: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return self.sampling.num_return_sequences

    @property
    def key(self) -> Any:
        # A seeded request shares its decode with no other: its own id makes its key unique.
        return (self.sampling, self.id) if self.sampling.seed is not None else self.sampling

    def cancel(self) -> None:
        """The client has gone: drop the request from the queue, or its rows from the running batch."""
        self.cancelled = True


class Arrival:
    """A request announced by ``Batcher.arriving``; ``done()`` (once queued or refused) withdraws it, once."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher, self.pending = batcher, True

    def done(self) -> None:
        with self.batcher.cond:
            if self.pending:
                self.pending = False
                self.batcher.incoming -= 1
                self.batcher.cond.notify_all()


class QueueFull(Exception):
    """The batcher's queue is full: the server is busy."""


class _Row:
    """One engine row: its tokens as text, released so that the pieces join to ``Pipeline.chat``'s text (as
    ``mmgpt.pipeline._TextStream``), and whether and why it ended."""

    def __init__(self, job: Job, indices: list[int], tokenizer, eos: set[int]) -> None:
        self.job, self.indices, self.tokenizer, self.eos = job, indices, tokenizer, eos
        self.stops = job.stop or []
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def push(self, token: int) -> tuple[str, str | None]:
        """Append a token; returns the new text and the finish reason (``None`` while the row runs)."""
        self.ids.append(token)
        text, stopped = cut_at_stop_string(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)
        reason = "stop" if token in self.eos or stopped else "length" if len(self.ids) >= self.job.max_tokens else None
        if reason is None:
            # Hold back what may still change: a character whose bytes continue in the next token (U+FFFD), a tail
            # a stop string starts with, and trailing whitespace (the final text is stripped).
            text = text.rstrip("\ufffd")
            held = max(
                (n for s in self.stops for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])),
                default=0,
            )
            text = text[: len(text) - held]
        text = text.strip()
        piece, self.sent = text[len(self.sent) :], text
        self.done = reason is not None
        return piece, reason

    def end(self) -> str:
        """The row's last text when the engine stopped without a reason seen here (its last step)."""
        self.done = True
        text = cut_at_stop_string(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stops)[0].strip()
        piece, self.sent = text[len(self.sent) :], text
        return piece


class Batcher:
    """Queues ``Job``s and decodes them in batches on one worker thread.

    Args:
        pipeline: the model, tokenizer and image processor; only the worker decodes with it.
        max_batch_size: the most rows decoded together.
        max_queue: the most requests waiting; ``submit`` raises ``QueueFull`` beyond it.
        batch_wait_s: the longest the worker, finding fewer queued requests than fill a batch, waits (from the
            oldest one's arrival) for requests still ``arriving`` (being received and checked) to join. It never
            waits when none is arriving, so a lone request starts at once.
    """

    def __init__(
        self, pipeline: Pipeline, max_batch_size: int = 16, max_queue: int = 256, batch_wait_s: float = 0.02
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.pipeline, self.max_batch_size, self.max_queue, self.batch_wait_s = (
            pipeline, max_batch_size, max_queue, batch_wait_s
        )
        self.block_size = pipeline.model.config.decoder.block_size
        self.pending: collections.deque[Job] = collections.deque()
        self.incoming = 0  # requests being received and checked, soon queued (`arriving`)
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        # Requests per decoded batch, newest last (what tests check), and the totals /health reports.
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)
        self.batches = self.requests = 0

    def start(self) -> None:
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self._work, name="mmgpt-serve-batcher", daemon=True)
            self.thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Decode what is queued, then end the worker; requests still queued after ``timeout`` seconds fail."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
            self.thread = None
        with self.cond:
            pending, self.pending = list(self.pending), collections.deque()
        for job in pending:
            job.sink(Failed(RuntimeError("the server is shutting down")))

    def submit(self, job: Job) -> None:
        """Queue a request. Raises ``QueueFull`` when ``max_queue`` requests wait already."""
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if sum(not j.cancelled for j in self.pending) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already")
            self.pending.append(job)
            self.cond.notify_all()

    def arriving(self) -> Arrival:
        """Mark a request on its way to ``submit`` (its body being read and checked) until ``done()`` is called on
        the mark: an idle worker waits up to ``batch_wait_s`` for such requests, so that requests sent together are
        decoded together."""
        with self.cond:
            self.incoming += 1
        return Arrival(self)

    @property
    def queued(self) -> int:
        return len(self.pending)

    # The worker.

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.batch_sizes.append(len(batch))
            self.batches += 1
            self.requests += len(batch)
            try:
                self._decode(batch)
            except Exception as e:  # the worker must outlive any one batch
                log.exception("batch of %d requests failed", len(batch))
                for job in batch:
                    job.sink(Failed(e))

    def _select(self) -> tuple[list[Job], bool]:
        """The oldest queued job and the queued jobs that can share its decode; and whether the batch is full."""
        first = self.pending[0]
        batch, rows = [first], first.rows
        T, N = first.prompt_tokens, first.max_tokens
        for job in itertools.islice(self.pending, 1, None):
            if rows >= self.max_batch_size:
                break
            if (
                job.key == first.key and rows + job.rows <= self.max_batch_size
                # Left-padded to the longest prompt, sized for the largest max_tokens: both must fit the context.
                and max(T, job.prompt_tokens) + max(N, job.max_tokens) <= self.block_size
            ):
                batch.append(job)
                rows += job.rows
                T, N = max(T, job.prompt_tokens), max(N, job.max_tokens)
        return batch, rows >= self.max_batch_size

    def _next_batch(self) -> list[Job] | None:
        with self.cond:
            while True:
                for job in [j for j in self.pending if j.cancelled]:
                    self.pending.remove(job)
                if self.pending:
                    break
                if self.stopping:
                    return None
                self.cond.wait()
            deadline = self.pending[0].arrived + self.batch_wait_s
            batch, full = self._select()
            while (
                self.incoming and not (full or self.stopping) and (remaining := deadline - time.monotonic()) > 0
            ):
                self.cond.wait(remaining)
                batch, full = self._select()
            for job in batch:
                self.pending.remove(job)
            return batch

    def _decode(self, jobs: list[Job]) -> None:
        pipeline = self.pipeline
        try:
            input_ids, attention_mask, image_embeds = pipeline.encode_chat([job.conversation for job in jobs])
        except Exception:
            if len(jobs) == 1:
                raise
            # Requests are checked before they are queued, so this is unexpected: decode each alone, so that one
            # bad request fails alone.
            log.exception("encoding a batch of %d requests failed; decoding them one by one", len(jobs))
            for job in jobs:
                try:
                    self._decode([job])
                except Exception as e:
                    job.sink(Failed(e))
            return
        sampling = jobs[0].sampling
        stops = {tuple(job.stop or ()) for job in jobs}
        # The engine drops a row at its stop string when the whole batch shares them; otherwise each row's own are
        # applied here (its later tokens dropped).
        config = sampling.config(
            max(job.max_tokens for job in jobs), pipeline.generation_config,
            (list(next(iter(stops))) or None) if len(stops) == 1 else None,
        )
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=pipeline.device).manual_seed(sampling.seed)
        eos = set(config.eos_token_ids)
        rows: list[_Row] = []
        for job in jobs:
            # Greedy n > 1 decodes one row and sends it as every choice.
            per_row = [[k] for k in range(job.n)] if job.rows == job.n else [list(range(job.n))]
            rows += [_Row(job, indices, pipeline.tokenizer, eos) for indices in per_row]
        left = {job: job.rows for job in jobs}
        tokens_out = dict.fromkeys(jobs, 0)

        def finish(row: _Row) -> None:
            left[row.job] -= 1
            tokens_out[row.job] += len(row.ids) * len(row.indices)

        steps = stream_tokens(
            pipeline.model, input_ids, attention_mask, image_embeds=image_embeds, generation_config=config,
            generator=generator, tokenizer=pipeline.tokenizer,
        )
        # closing(): leaving early (every row done or gone) frees the model's KV cache and lock at once.
        with contextlib.closing(steps):
            for out_rows, tokens in steps:
                updates: dict[Job, Step] = {}
                for r, token in zip(out_rows.tolist(), tokens.tolist(), strict=True):
                    row = rows[r]
                    if row.done or row.job.cancelled:
                        continue
                    piece, reason = row.push(token)
                    step = updates.setdefault(row.job, Step())
                    for i in row.indices:
                        if piece:
                            step.pieces[i] = piece
                        if reason:
                            step.finished[i] = reason
                    if reason:
                        finish(row)
                self._send(updates, left, tokens_out)
                if all(row.done or row.job.cancelled for row in rows):
                    break
        # Rows the engine ended without a reason seen here: its last step (max_new_tokens), or a stop string it
        # found in a way the text check did not (it reads a window of tokens).
        updates = {}
        for row in rows:
            if not (row.done or row.job.cancelled):
                piece = row.end()
                step = updates.setdefault(row.job, Step())
                for i in row.indices:
                    if piece:
                        step.pieces[i] = piece
                    step.finished[i] = "length" if len(row.ids) >= row.job.max_tokens else "stop"
                finish(row)
        self._send(updates, left, tokens_out)

    @staticmethod
    def _send(updates: dict[Job, Step], left: dict[Job, int], tokens_out: dict[Job, int]) -> None:
        for job, step in updates.items():
            if job.cancelled:
                continue
            job.sink(step)
            if left[job] == 0:
                job.sink(Done(tokens_out[job]))
