"""Threads sharing one model: its KV cache lives in the decoder, so generations take turns and every call returns
exactly what it returns alone; an unfinished stream in the same thread is an error, not a deadlock."""

from __future__ import annotations

import copy
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mmgpt.generation.engine import generate, stream_tokens

THREADS = 6


@pytest.fixture
def pictures() -> list[torch.Tensor]:
    # Raw pixels in [0, 1], which every version of the image processor reads as an image.
    g = torch.Generator().manual_seed(5)
    return [torch.rand(3, 32, 32, generator=g) for _ in range(3)]


def calls(pipeline, pictures):
    """Mixed requests, each a zero-argument call: image and text prompts, a batch, sampling, beams, an encoded
    image, and streams (joined, so they compare as text)."""
    handle = pipeline.encode_image(pictures[2])
    kw = dict(max_new_tokens=10)
    return [
        lambda: pipeline.generate(pictures[0], "Describe the image.", **kw),
        lambda: pipeline.generate(None, "What is one plus one?", **kw),
        lambda: pipeline.generate([pictures[1], None], ["Where is the red square?", "Hi"], **kw),
        lambda: pipeline.generate(pictures[1], "How many shapes are there?", do_sample=True, seed=3, **kw),
        lambda: "".join(pipeline.stream(pictures[0], "What color is the circle?", **kw)),
        lambda: pipeline.generate(handle, "Count the shapes.", num_beams=2, **kw),
        lambda: pipeline.generate([[pictures[0], pictures[2]]], ["Compare the two images."], **kw),
        lambda: "".join(pipeline.stream(None, "Count from two to five.", repetition_penalty=1.3, **kw)),
        lambda: pipeline.encode_image(pictures[1]).embeds,
    ]


def same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_threads_sharing_a_pipeline_get_their_serial_answers(lively, pipeline, pictures):
    requests = calls(pipeline, pictures)
    serial = [call() for call in requests]
    assert len({str(s) for s in serial[:-1]}) == len(serial) - 1  # distinct answers: a swap would show
    for _ in range(3):  # races are a matter of timing: a few rounds, each call twice, in shuffled order
        order = torch.randperm(2 * len(requests)).tolist()
        with ThreadPoolExecutor(THREADS) as pool:
            futures = {i: pool.submit(requests[i % len(requests)]) for i in order}
        for i, future in futures.items():
            assert same(future.result(), serial[i % len(requests)]), f"request {i % len(requests)}"


def test_functional_generate_and_stream_tokens_take_turns(lively, pipeline):
    ids, mask, _ = pipeline.encode([None, None], ["Hi", "What is one plus one?"])
    expected = generate(lively, ids, mask, max_new_tokens=12)

    def streamed():
        out = torch.zeros_like(expected)
        for step, (rows, tokens) in enumerate(stream_tokens(lively, ids, mask, max_new_tokens=12)):
            out[rows, step] = tokens
        return out

    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(streamed if i % 2 else lambda: generate(lively, ids, mask, max_new_tokens=12))
                   for i in range(2 * THREADS)]
    for f in futures:
        assert torch.equal(f.result(), expected)


def test_another_thread_waits_for_an_open_stream(lively, pipeline):
    expected = pipeline.generate(None, "Hi", max_new_tokens=8)
    stream = pipeline.stream(None, "What is one plus one?", max_new_tokens=8)
    next(stream)  # the stream now holds the model
    result = []
    waiter = threading.Thread(target=lambda: result.append(pipeline.generate(None, "Hi", max_new_tokens=8)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not result  # waiting, not decoding into the stream's cache
    list(stream)  # exhausted: the model is free
    waiter.join(timeout=30)
    assert result == [expected]


def test_a_second_generation_in_the_streams_thread_is_refused(lively, pipeline):
    expected = pipeline.generate(None, "Hi", max_new_tokens=8)
    stream = pipeline.stream(None, "What is one plus one?", max_new_tokens=8)
    next(stream)
    with pytest.raises(RuntimeError, match="unfinished stream"):
        pipeline.generate(None, "Hi", max_new_tokens=8)
    ids, mask, _ = pipeline.encode([None], ["Hi"])
    with pytest.raises(RuntimeError, match="already generating in this thread"):
        next(stream_tokens(lively, ids, mask))
    stream.close()  # closing releases the model at once
    assert pipeline.generate(None, "Hi", max_new_tokens=8) == expected
    # A loop left early releases it when its generator goes away; so does an error inside the stream.
    for _ in pipeline.stream(None, "Hi", max_new_tokens=8):
        break
    assert pipeline.generate(None, "Hi", max_new_tokens=8) == expected
    with pytest.raises(ValueError, match="exceeds decoder.block_size"):
        list(pipeline.stream(None, "Hi", max_new_tokens=1000))
    assert pipeline.generate(None, "Hi", max_new_tokens=8) == expected


def test_the_model_still_copies_and_pickles(lively, pipeline):
    # The locks are kept off the module: a threading.Lock attribute would break deepcopy and pickling.
    expected = pipeline.generate(None, "Hi", max_new_tokens=8)
    twin = copy.deepcopy(pipeline)
    assert isinstance(pickle.loads(pickle.dumps(lively)), type(lively))
    # A copy has a cache and a lock of its own: it decodes beside the original, with the same answers.
    stream = pipeline.stream(None, "Hi", max_new_tokens=8)
    first = next(stream)
    assert twin.generate(None, "Hi", max_new_tokens=8) == expected
    assert first + "".join(stream) == expected


def test_a_stream_resumed_in_another_thread_lets_its_first_thread_wait_its_turn(lively, pipeline):
    # A web server's worker pool runs each next() of a streamed response on whichever worker is free.
    expected = pipeline.generate(None, "What is one plus one?", max_new_tokens=4)
    whole = "".join(pipeline.stream(None, "Hi", max_new_tokens=16))
    stream = pipeline.stream(None, "Hi", max_new_tokens=16)
    with ThreadPoolExecutor(1) as a, ThreadPoolExecutor(1) as b:
        pieces = [a.submit(next, stream).result(), b.submit(next, stream).result()]
        waiting = a.submit(pipeline.generate, None, "What is one plus one?", max_new_tokens=4)  # must not raise
        pieces += b.submit(list, stream).result()
        assert waiting.result(timeout=60) == expected
    assert "".join(pieces) == whole
