"""Continuous batching in ``mmgpt serve``: concurrent requests are decoded together and answer exactly what they
answer one at a time; requests arriving while a batch decodes join it; a row leaves the batch as soon as it ends
(its own max_tokens, its stop strings) or its client leaves, without disturbing the others."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live_server import EXAMPLES, MODEL_NAME, client, expected, image_message, pipeline, running, text_message

pytest.importorskip("fastapi")
pytest.importorskip("openai")

# A mix of image and text prompts, limits and stop strings: rows of one batch end at different steps, for
# different reasons.
REQUESTS = [
    dict(messages=image_message("Describe the image.")),
    dict(messages=text_message("What is one plus one?")),
    dict(messages=image_message("What color is the circle?", EXAMPLES / "1.png"), max_tokens=3),
    dict(messages=image_message("Describe the image.", EXAMPLES / "2.png"), stop=[" at"]),
    dict(messages=text_message("How many sides does a triangle have?")),
    dict(messages=image_message("What shape is at the center?")),
    dict(messages=image_message("Describe the image.", EXAMPLES / "3.png"), max_tokens=7),
    dict(messages=[{"role": "system", "content": "Answer briefly."}, *text_message("Name a shape.")]),
    dict(messages=image_message("How many green shapes are there?", EXAMPLES / "1.png")),
    dict(messages=text_message("<|eos|> is just text")),
    dict(messages=image_message("Describe the image.", EXAMPLES / "1.png"), max_tokens=12),
    dict(messages=image_message("What color is the square?", EXAMPLES / "2.png")),
]


@pytest.fixture(scope="module")
def server():
    with running(max_batch_size=16) as s:
        yield s


@contextlib.contextmanager
def patient(batcher):
    """The batcher waiting longer than its default for requests to share a batch: threads started together reach
    the queue within it even on a busy machine, so the test sees them batched."""
    default, batcher.batch_wait_s = batcher.batch_wait_s, 0.5
    try:
        yield
    finally:
        batcher.batch_wait_s = default


def _ask(api, request: dict, stream: bool = False) -> tuple[str, str, int]:
    kwargs = dict(model=MODEL_NAME, temperature=0, **request)
    if not stream:
        r = api.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    text, reason, usage = "", None, None
    for c in api.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if c.choices:
            text += c.choices[0].delta.content or ""
            reason = c.choices[0].finish_reason or reason
        if c.usage:
            usage = c.usage.completion_tokens
    return text, reason, usage


def _concurrently(api, requests: list[dict], stream: bool) -> list[tuple[str, str, int]]:
    start = threading.Barrier(len(requests))

    def ask(request):
        start.wait()
        return _ask(api, request, stream)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(ask, requests))


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_concurrent_requests_equal_serial_ones_and_are_batched(server, stream):
    api = client(server)
    serial = [_ask(api, r, stream) for r in REQUESTS]
    # The oracle: each request alone through Pipeline.chat.
    for (text, reason, tokens), r in zip(serial, REQUESTS, strict=True):
        stop = {"stop_strings": r["stop"]} if "stop" in r else {}
        assert (text, tokens, reason) == (
            (e := expected(r["messages"], r.get("max_tokens", 48), **stop))[0], e[2], e[3]
        )
    before = len(server.batcher.batch_sizes)
    with patient(server.batcher):
        concurrent = _concurrently(api, REQUESTS, stream)
    assert concurrent == serial
    sizes = list(server.batcher.batch_sizes)[before:]
    assert sum(sizes) == len(REQUESTS) and max(sizes) > 1, sizes


def test_a_client_leaving_mid_stream_leaves_the_batch_and_server_serving(server):
    api = client(server)
    long = dict(messages=image_message("Describe the image."))
    want = _ask(api, long)
    others = REQUESTS[:5]
    want_others = [_ask(api, r) for r in others]

    def leave():
        body = {"model": MODEL_NAME, "temperature": 0, "stream": True, **long}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            next(lines)
        # Leaving the block closed the connection mid-answer.

    start = threading.Barrier(len(others) + 1)
    with patient(server.batcher), ThreadPoolExecutor(len(others) + 1) as pool:
        left = pool.submit(lambda: (start.wait(), leave()))
        answers = list(pool.map(lambda r: (start.wait(), _ask(api, r))[1], others))
        left.result()
    assert answers == want_others
    assert _ask(api, long) == want and _ask(api, long, stream=True) == want
    assert server.batcher.queued == 0


def test_a_client_leaving_a_non_streamed_request(server):
    body = json.dumps({"model": MODEL_NAME, "temperature": 0, "messages": image_message("Describe the image.")})
    host, port = server.url.removeprefix("http://").split(":")
    for _ in range(3):  # sent, then the connection closed before the answer
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
            )
    time.sleep(0.2)
    text, _, tokens, reason = expected(text_message("What is one plus one?"))
    assert _ask(client(server), dict(messages=text_message("What is one plus one?"))) == (text, reason, tokens)
    assert server.batcher.queued == 0


def test_seeded_requests_decode_alone(server):
    api = client(server)
    kwargs = dict(model=MODEL_NAME, messages=text_message("Describe a shape."), temperature=0.8, max_tokens=10)
    before = len(server.batcher.batch_sizes)
    with patient(server.batcher), ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda seed: api.chat.completions.create(seed=seed, **kwargs), [1, 1, 2]))
    sizes = list(server.batcher.batch_sizes)[before:]
    assert sizes == [1, 1, 1]
    texts = [o.choices[0].message.content for o in outs]
    assert texts[0] == texts[1]
    assert texts[0] == pipeline().chat(
        kwargs["messages"], max_new_tokens=10, do_sample=True, temperature=0.8, top_k=None, seed=1
    )


def test_a_full_queue_is_refused(tmp_path):
    from mmgpt.serve.batcher import Batcher, Job, QueueFull, Sampling

    batcher = Batcher(pipeline(), max_queue=2)  # not started: nothing leaves the queue
    job = lambda: Job(text_message("hi"), 5, 4, Sampling(), sink=lambda e: None)  # noqa: E731
    batcher.submit(job())
    batcher.submit(job())
    with pytest.raises(QueueFull):
        batcher.submit(job())
    with running(max_queue=0) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": text_message("hi")}, timeout=60)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "server_error"


def _collect(events: list) -> tuple[dict[int, str], dict[int, str], int | None]:
    from mmgpt.serve.batcher import Done, Step

    texts, reasons, tokens = {}, {}, None
    for e in events:
        if isinstance(e, Step):
            for i, piece in e.pieces.items():
                texts[i] = texts.get(i, "") + piece
            reasons.update(e.finished)
        elif isinstance(e, Done):
            tokens = e.completion_tokens
        else:
            raise AssertionError(e)
    return texts, reasons, tokens


def test_one_batch_with_every_limit_and_stop_equals_each_alone():
    """Queued before the worker starts, the requests are decoded as one batch: rows with their own max_tokens and
    stop strings (not shared, so applied per row) each get exactly their answer alone."""
    from live_server import to_mmgpt

    from mmgpt.serve.batcher import Batcher, Job, Sampling

    batcher = Batcher(pipeline(), max_batch_size=16)
    events = [[] for _ in REQUESTS]
    for request, sink in zip(REQUESTS, events, strict=True):
        max_tokens = request.get("max_tokens", 48)
        batcher.submit(Job(to_mmgpt(request["messages"]), 30, max_tokens, Sampling(), sink=sink.append,
                           stop=request.get("stop")))
    batcher.start()
    batcher.stop()  # decodes what is queued, then ends the worker
    assert list(batcher.batch_sizes) == [len(REQUESTS)]
    for request, got in zip(REQUESTS, events, strict=True):
        stop = {"stop_strings": request["stop"]} if "stop" in request else {}
        text, _, tokens, reason = expected(request["messages"], request.get("max_tokens", 48), **stop)
        assert _collect(got) == ({0: text}, {0: reason}, tokens)


def test_requests_are_grouped_by_how_they_decode():
    from live_server import to_mmgpt

    from mmgpt.serve.batcher import Batcher, Job, Sampling

    greedy, sampled = Sampling(), Sampling(do_sample=True, temperature=0.7)
    seeded = Sampling(do_sample=True, temperature=0.7, seed=1)
    pairs = Sampling(do_sample=True, temperature=0.7, num_return_sequences=2)
    order = [greedy, sampled, greedy, seeded, sampled, pairs, greedy, seeded, pairs]
    batcher = Batcher(pipeline(), max_batch_size=16)
    sinks = [[] for _ in order]
    conversation = to_mmgpt(text_message("Name a shape."))
    for sampling, sink in zip(order, sinks, strict=True):
        n = sampling.num_return_sequences
        batcher.submit(Job(conversation, 10, 6, sampling, sink=sink.append, n=n))
    batcher.start()
    batcher.stop()
    # Oldest first, each with every later request that decodes alike; seeded requests alone.
    assert list(batcher.batch_sizes) == [3, 2, 1, 2, 1]
    for sampling, sink in zip(order, sinks, strict=True):
        texts, reasons, tokens = _collect(sink)
        assert set(texts) <= set(reasons) == set(range(sampling.num_return_sequences)) and tokens


def _job(request: dict, sink, **kwargs):
    """A greedy ``Job`` for an OpenAI-style request, with its real prompt length (joining checks it)."""
    from live_server import to_mmgpt

    from mmgpt.serve.batcher import Job, Sampling

    conversation = to_mmgpt(request["messages"])
    prompt_tokens = pipeline().encode_chat([conversation])[0].size(1)
    return Job(conversation, prompt_tokens, request.get("max_tokens", 48), Sampling(), sink=sink,
               stop=request.get("stop"), **kwargs)


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# 48 tokens of "zero" from the shipped model: a row that runs to max_tokens.
LONG = dict(messages=text_message("<|eos|> is just text"))


def test_requests_queued_during_a_decode_join_it_and_equal_each_alone():
    """One request decodes; after its k-th step, request k is queued: each joins the running batch at the next
    step, and every answer equals the one it gets alone."""
    from mmgpt.serve.batcher import Batcher, Done

    later = REQUESTS[:8]
    batcher = Batcher(pipeline(), max_batch_size=16)
    events = [[] for _ in range(1 + len(later))]
    jobs = [_job(r, sink.append) for r, sink in zip(later, events[1:], strict=True)]

    def first_sink(event) -> None:  # runs in the worker, between two steps
        events[0].append(event)
        steps = len(events[0])
        if steps <= len(jobs):
            batcher.submit(jobs[steps - 1])

    batcher.submit(_job(LONG, first_sink))
    batcher.start()
    _wait_for(lambda: all(e and isinstance(e[-1], Done) for e in events))
    batcher.stop()
    assert list(batcher.batch_sizes) == [1 + len(later)] and batcher.joined == len(later)
    for request, got in zip([LONG, *later], events, strict=True):
        stop = {"stop_strings": request["stop"]} if "stop" in request else {}
        text, _, tokens, reason = expected(request["messages"], request.get("max_tokens", 48), **stop)
        assert _collect(got) == ({0: text}, {0: reason}, tokens)


def test_rows_leave_at_their_own_max_tokens_and_when_cancelled():
    """Beside a row that runs 48 steps, one with max_tokens=2 and one cancelled after 3 steps are decoded only
    for those steps: the decoded row-steps are the long row's 48, plus 2, plus 3."""
    from mmgpt.serve.batcher import Batcher, Step

    batcher = Batcher(pipeline(), max_batch_size=16)
    long, short, gone = [], [], []

    def leave_after_three(event) -> None:
        gone.append(event)
        if sum(isinstance(e, Step) for e in gone) == 3:
            cancelled.cancel()

    batcher.submit(_job(LONG, long.append))
    batcher.submit(_job(dict(messages=image_message("Describe the image."), max_tokens=2), short.append))
    batcher.submit(cancelled := _job(dict(messages=image_message("Describe the image.", EXAMPLES / "2.png")),
                                     leave_after_three))
    batcher.start()
    batcher.stop()
    assert list(batcher.batch_sizes) == [3] and batcher.joined == 0
    assert _collect(long)[2] == 48 and _collect(short)[1:] == ({0: "length"}, 2)
    assert batcher.steps == 48 and batcher.row_steps == 48 + 2 + 3


def test_requests_sent_while_an_answer_streams_join_its_batch(server, monkeypatch):
    """Over HTTP: requests sent while a long answer streams join its batch, and answer what they answer alone."""
    from mmgpt.serve.batcher import ContinuousBatch

    api = client(server)
    others = REQUESTS[:6]
    long_request = dict(LONG, max_tokens=96)
    want = [_ask(api, r) for r in others]
    want_long = _ask(api, long_request, stream=True)
    # Slower steps: the long answer then decodes for about a second, and the others, sent once it has started,
    # reach the server well before it ends, even on a busy machine.
    step = ContinuousBatch.step
    monkeypatch.setattr(ContinuousBatch, "step", lambda self: (time.sleep(0.01), step(self))[1])
    batcher = server.batcher
    steps, joined = batcher.steps, batcher.joined
    with ThreadPoolExecutor(1 + len(others)) as pool:
        long = pool.submit(_ask, api, long_request, True)
        _wait_for(lambda: batcher.steps > steps)
        answers = list(pool.map(lambda r: _ask(api, r), others))
        assert long.result() == want_long
    assert answers == want
    assert batcher.joined > joined


def test_a_request_longer_than_counted_joins_once_it_fits():
    """A ``Job`` whose counted prompt is shorter than its encoded one is checked again once encoded: beside a row
    that needs the rest of the context it does not fit yet, so it goes back to the queue, counted right, and joins
    once the running row's slots have grown past its prompt (its prompt then fits before them)."""
    from mmgpt.serve.batcher import Batcher, Done

    long = dict(LONG, max_tokens=110)  # 18 + 110 slots: the whole context
    system = {"role": "system", "content": "Answer briefly."}
    short = dict(messages=[system, *image_message("What color is the circle?")], max_tokens=10)
    batcher = Batcher(pipeline(), max_batch_size=16)
    events, order = [[], []], []
    late = _job(short, lambda e: (events[1].append(e), order.append(1)))
    assert late.prompt_tokens == 30
    late.prompt_tokens = 12  # counted short: by the count it would join at once

    def first_sink(event) -> None:
        events[0].append(event)
        order.append(0)
        if len(events[0]) == 1:
            batcher.submit(late)

    batcher.submit(_job(long, first_sink))
    batcher.start()
    _wait_for(lambda: all(e and isinstance(e[-1], Done) for e in events))
    batcher.stop()
    assert list(batcher.batch_sizes) == [2] and batcher.joined == 1 and late.prompt_tokens == 30
    # It joined when the long row's slots reached its 30 tokens, after 12 steps (not after the first): its first
    # token came with the long row's 13th.
    assert order.index(1) == 13
    for request, got in zip([long, short], events, strict=True):
        text, _, tokens, reason = expected(request["messages"], request["max_tokens"])
        assert _collect(got) == ({0: text}, {0: reason}, tokens)
