"""Continuous batching: one worker thread decodes every request, adding new ones to the running batch between two
decode steps.

The model holds one KV cache, so it decodes one batch at a time (``mmgpt.generation.decode_state``); a thread per
request would only take turns. Instead every request is queued, and the worker decodes them on the engine's
``ContinuousBatch``. A batch starts with the oldest queued request and every queued one that can share its decode:

* the same sampling settings (greedy with greedy; sampling with the same temperature, top_p, top_k, min_p,
  repetition penalty and ``n``), since the engine applies one ``GenerationConfig`` to the whole batch;
* not seeded: a request with ``seed`` is decoded alone, so that its sample depends on the seed only, not on which
  other requests shared its random stream;
* prompts and ``max_tokens`` that fit the context together;
* at most ``max_batch_size`` output rows (``n`` rows for a request with ``n`` samples).

Then, between two steps, the queued requests that can share the decode join it (prefilled together, and decoded
with the others from the next step on) while they fit ``max_batch_size`` and the KV cache beside the running rows,
in arrival order: the first that cannot, or a request that decodes otherwise, stops the joining, so that the batch
drains and that request goes next (no request waits behind later ones). A prefill has a fixed cost of several
decode steps on a CPU, so requests join in groups: once they are ``join_ratio`` of the running rows, fill the
batch, or the oldest has waited ``batch_wait_s``.

A row leaves the batch, and costs nothing after, as soon as it ends: eos, its own stop strings, its own
``max_tokens``, or its client gone. The batch ends when no row is left. Greedy rows get exactly the tokens they get
alone, wherever they joined: every row keeps its own positions and mask (``mmgpt.generation.continuous_batch``).

Results go back through each request's ``sink``, a callable the worker thread calls with ``Step``, ``Done`` and
``Failed`` events (``mmgpt.serve.app`` passes one that hands them to the event loop).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmgpt.generation.config import GenerationConfig
from mmgpt.generation.continuous_batch import ContinuousBatch
from mmgpt.pipeline import Pipeline, TextStream

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
    """One engine row: its tokens as text (a ``TextStream``, so the pieces join to ``Pipeline.chat``'s text), and
    whether and why it ended."""

    def __init__(self, job: Job, indices: list[int], tokenizer, eos: set[int]) -> None:
        self.job, self.indices, self.eos = job, indices, eos
        self.text = TextStream(tokenizer, job.stop)

    @property
    def ids(self) -> list[int]:
        return self.text.ids

    def push(self, token: int) -> tuple[str, str | None]:
        """Append a token; returns the new text and the finish reason (``None`` while the row runs)."""
        last = token in self.eos or len(self.ids) + 1 >= self.job.max_tokens
        piece = self.text.push(token, final=last)
        reason = "stop" if token in self.eos or self.text.stopped else "length" if last else None
        return piece, reason

    def end(self) -> str:
        """The row's last text when the engine stopped without a reason seen here (its last step)."""
        return self.text.end()


class Batcher:
    """Queues ``Job``s and decodes them in batches on one worker thread.

    Args:
        pipeline: the model, tokenizer and image processor; only the worker decodes with it.
        max_batch_size: the most rows decoded together.
        max_queue: the most requests waiting; ``submit`` raises ``QueueFull`` beyond it.
        batch_wait_s: the longest the worker, finding fewer queued requests than fill a batch, waits (from the
            oldest one's arrival) for requests still ``arriving`` (being received and checked) to start with them
            (it never waits when none is arriving, so a lone request starts at once); and the longest a queued
            request waits for others to join the running batch with (``join_ratio``).
        continuous: queued requests join the running batch between steps; False starts them with the next batch
            (rows still leave when they end).
        join_ratio: a running batch takes queued requests once they are at least this share of its running rows
            (or fill it, or the oldest has waited ``batch_wait_s``): each join is a prefill whose fixed cost, on a
            CPU several times a decode step, the requests joining together share.

    Counters (``/health`` reports them): ``batches`` started, ``requests`` decoded, ``batch_sizes`` (requests per
    batch, newest last, joined ones included), ``joined`` (requests that joined a running batch), ``steps``
    (decode steps) and ``row_steps`` (rows decoded, summed over the steps: a row that leaves early stops counting).
    """

    def __init__(
        self, pipeline: Pipeline, max_batch_size: int = 16, max_queue: int = 256, batch_wait_s: float = 0.02,
        continuous: bool = True, join_ratio: float = 0.25,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.pipeline, self.max_batch_size, self.max_queue, self.batch_wait_s = (
            pipeline, max_batch_size, max_queue, batch_wait_s
        )
        self.continuous, self.join_ratio = continuous, join_ratio
        self.block_size = pipeline.model.config.decoder.block_size
        self.pending: collections.deque[Job] = collections.deque()
        self.incoming = 0  # requests being received and checked, soon queued (`arriving`)
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        # Requests per decoded batch, newest last (what tests check), and the totals /health reports.
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)
        self.batches = self.requests = self.joined = self.steps = self.row_steps = 0

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
        while (jobs := self._next_batch()) is not None:
            self._run(jobs)

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

    def _joiners(self, running: _Running) -> list[Job]:
        """Take the queued jobs that join the running batch now: in arrival order, while they decode alike, fit
        ``max_batch_size`` and fit the cache beside the running rows (by their counted prompts; ``_admit`` checks
        the encoded ones). The first that does not stops the rest, so that no request waits behind later ones: an
        older request that decodes otherwise goes first once this batch has drained. They join once they are
        ``join_ratio`` of the running rows, fill the batch, or the oldest has waited ``batch_wait_s``."""
        if not self.continuous:
            return []
        with self.cond:
            running_rows = len(running.batch)
            jobs, rows, T, N = [], running_rows, 0, 0
            for job in self.pending:
                if job.cancelled:
                    continue
                if job.key != running.key or rows + job.rows > self.max_batch_size:
                    break
                T, N = max(T, job.prompt_tokens), max(N, job.max_tokens)
                if not running.batch.fits(T, N):
                    break
                jobs.append(job)
                rows += job.rows
            enough = min(self.max_batch_size - running_rows, max(1.0, self.join_ratio * running_rows))
            if not jobs or (rows - running_rows < enough and time.monotonic() - jobs[0].arrived < self.batch_wait_s):
                return []
            for job in jobs:
                self.pending.remove(job)
            return jobs

    def _run(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` and every request that joins them, until the batch has no rows left."""
        sampling = jobs[0].sampling
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.pipeline.device).manual_seed(sampling.seed)
        running = _Running(self.pipeline, jobs[0].key, sampling, max(job.max_tokens for job in jobs), generator)
        self.batch_sizes.append(0)
        self.batches += 1
        try:
            with running.batch:
                self._admit(running, jobs)
                while running.batch:
                    rows = running.step()
                    self.steps += 1
                    self.row_steps += rows
                    if running.batch and (joiners := self._joiners(running)):
                        self._admit(running, joiners, joining=True)
        except Exception as e:  # the worker must outlive any one batch
            log.exception("a batch of %d requests failed", len(running.jobs))
            for job in running.jobs:
                job.sink(Failed(e))

    def _admit(self, running: _Running, jobs: list[Job], joining: bool = False) -> None:
        """Encode ``jobs`` and add them to the batch (``joining``: a running one)."""
        try:
            encoded = self.pipeline.encode_chat([job.conversation for job in jobs])
        except Exception as e:
            if len(jobs) == 1:
                log.exception("encoding a request failed")
                jobs[0].sink(Failed(e))
                return
            # Requests are checked before they are queued, so this is unexpected: add each alone, so that one bad
            # request fails alone.
            log.exception("encoding %d requests together failed; adding them one by one", len(jobs))
            for job in jobs:
                self._admit(running, [job], joining)
            return
        if joining and not running.batch.fits(encoded[0].size(1), max(job.max_tokens for job in jobs)):
            # Longer than counted (a Job built by hand): counted right, and back to the front of the queue.
            for job, length in zip(jobs, encoded[1].sum(dim=1).tolist(), strict=True):
                job.prompt_tokens = length
            with self.cond:
                self.pending.extendleft(reversed(jobs))
            return
        try:
            running.add(jobs, *encoded)
        except Exception as e:
            for job in jobs:
                job.sink(Failed(e))
            raise  # the batch may be left half-changed: it ends, and its requests fail
        self.batch_sizes[-1] += len(jobs)
        self.requests += len(jobs)
        if joining:
            self.joined += len(jobs)


class _Running:
    """The worker's running batch: the engine's ``ContinuousBatch``, and per engine row the request it answers.

    Each step's tokens become text per row (``_Row``) and go to the requests' sinks; a row leaves the batch when
    the engine ends it (eos, its stop strings, its ``max_tokens``), when its text holds a stop string, or when its
    request is cancelled.
    """

    def __init__(
        self, pipeline: Pipeline, key: Any, sampling: Sampling, max_tokens: int, generator: torch.Generator | None
    ) -> None:
        self.pipeline, self.key = pipeline, key
        config = sampling.config(max_tokens, pipeline.generation_config, None)
        self.eos = set(config.eos_token_ids)
        self.batch = ContinuousBatch(
            pipeline.model, config, capacity=pipeline.model.config.decoder.block_size, generator=generator,
            tokenizer=pipeline.tokenizer,
        )
        self.rows: dict[int, _Row] = {}  # engine row id -> its row, while it runs
        self.jobs: dict[Job, list[int]] = {}  # request -> [rows still running, completion tokens], until done

    def add(self, jobs: list[Job], input_ids, attention_mask, image_embeds) -> None:
        ids = self.batch.add(
            input_ids, attention_mask, image_embeds=image_embeds, max_new_tokens=[job.max_tokens for job in jobs],
            stop_strings=[job.stop or None for job in jobs],
        )
        per_job = iter(ids)
        for job in jobs:
            # Greedy n > 1 decodes one row and sends it as every choice.
            indices = [[k] for k in range(job.n)] if job.rows == job.n else [list(range(job.n))]
            for choice in indices:
                self.rows[next(per_job)] = _Row(job, choice, self.pipeline.tokenizer, self.eos)
            self.jobs[job] = [len(indices), 0]

    def step(self) -> int:
        """Decode one step, send what it wrote, and drop the rows that ended or whose request is cancelled;
        returns the rows decoded."""
        ids, tokens, ended = self.batch.step()
        updates: dict[Job, Step] = {}
        leaving = []
        for r, token, end in zip(ids.tolist(), tokens.tolist(), ended.tolist(), strict=True):
            row = self.rows[r]
            if row.job.cancelled:
                continue
            piece, reason = row.push(token)
            if end and reason is None:
                # The engine found a stop string that the text check does not see yet (it reads a window of tokens).
                piece += row.end()
                reason = "length" if len(row.ids) >= row.job.max_tokens else "stop"
            step = updates.setdefault(row.job, Step())
            for i in row.indices:
                if piece:
                    step.pieces[i] = piece
                if reason:
                    step.finished[i] = reason
            if reason:
                del self.rows[r]
                self.jobs[row.job][0] -= 1
                self.jobs[row.job][1] += len(row.ids) * len(row.indices)
                if not end:
                    leaving.append(r)
        for job, step in updates.items():
            job.sink(step)
            if self.jobs[job][0] == 0:
                job.sink(Done(self.jobs.pop(job)[1]))
        # Rows whose request is cancelled (the client has gone) leave with those that ended by their text.
        for r, row in list(self.rows.items()):
            if row.job.cancelled:
                del self.rows[r]
                self.jobs.pop(row.job, None)
                leaving.append(r)
        self.batch.finish(leaving)
        return len(ids)
