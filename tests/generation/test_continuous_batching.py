"""Continuous batching (``ContinuousBatch``): prompts join a running batch between two steps, rows leave when they
end or when the caller finishes them, and every row gets exactly the greedy tokens it gets alone, on the native
decoder (causal and prefix-LM) and on HF decoders (``backend: hf``)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PROJECTOR, TINY_VISION, make_lively

from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.generation.config import GenerationConfig
from mmgpt.generation.continuous_batch import ContinuousBatch
from mmgpt.generation.engine import stream_tokens
from mmgpt.models.mmgpt import MMGPT
from mmgpt.pipeline import Pipeline
from mmgpt.prompts import IMAGE


def hf_pipeline(tokenizer, kind: str) -> Pipeline:
    """A tiny random HF decoder behind mmgpt's tokenizer: Llama (RoPE) or GPT-2 (learned positions)."""
    hf_config = {
        "llama": dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
        "gpt2": dict(model_type="gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128),
    }[kind]
    config = MMGPTConfig(
        vision=VisionConfig(**TINY_VISION), projector=ProjectorConfig(**TINY_PROJECTOR),
        decoder=DecoderConfig(vocab_size=len(tokenizer), block_size=128, hf_config=hf_config, backend="hf"),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    torch.manual_seed(0)
    return Pipeline(make_lively(MMGPT(config)), tokenizer)


@pytest.fixture(params=["causal", "prefix", "hf-llama", "hf-gpt2"])
def pipe(request, tiny_config, tokenizer) -> Pipeline:
    if request.param.startswith("hf-"):
        return hf_pipeline(tokenizer, request.param.removeprefix("hf-"))
    tiny_config.decoder.attention = request.param
    torch.manual_seed(0)
    return Pipeline(make_lively(MMGPT(tiny_config)), tokenizer)


@pytest.fixture
def requests(images) -> list[tuple]:
    """(images, prompt, max_new_tokens): text-only and image prompts of very different lengths."""
    return [
        (images[0], "Describe the image.", 12),
        (None, "What is one plus one?", 6),
        ([images[1], images[2]], "Compare the two images.", 10),
        (None, "Hi", 4),
        ([images[2], images[0], images[1]], "Which of the three images is the brightest one here?", 9),
        (images[1], "What shape?", 11),
    ]


def alone(pipe: Pipeline, request: tuple, **kwargs) -> list[int]:
    image, prompt, max_new = request
    ids, mask, pixels = pipe.encode([image], [prompt])
    return [int(t) for _, t in stream_tokens(pipe.model, ids, mask, pixels, max_new_tokens=max_new, **kwargs)]


def run(pipe: Pipeline, requests: list[tuple], schedule: dict, capacity: int = 128, **kwargs) -> dict:
    """Decode on one ``ContinuousBatch``, before step k doing ``schedule[k]``: ``("add", [i, ...])`` adds those
    requests (left-padded together), ``("finish", [i, ...])`` ends their rows. Returns the tokens of each
    request's first row by index ``i``, of its further rows (``num_return_sequences``) by ``(i, copy)``, and the
    slot the batch writes next after each add as ``"slots"``."""
    config = GenerationConfig(**kwargs)
    n = config.num_return_sequences
    rows_of, tokens_of, slots = {}, {}, []  # request -> its row ids; row id -> its tokens
    with ContinuousBatch(pipe.model, config, capacity=capacity, tokenizer=pipe.tokenizer) as batch:
        step = 0
        while batch or step <= max(schedule):
            for action, which in schedule.get(step, []):
                if action == "finish":
                    batch.finish([row for i in which for row in rows_of[i]])
                    continue
                chosen = [requests[i] for i in which]
                ids, mask, pixels = pipe.encode([r[0] for r in chosen], [r[1] for r in chosen])
                limits = [r[2] for r in chosen]
                assert batch.fits(ids.size(1), max(limits))
                rows = batch.add(ids, mask, pixels, max_new_tokens=limits)
                slots.append(batch.state.pos)
                for k, i in enumerate(which):
                    rows_of[i] = rows[k * n : (k + 1) * n]
                tokens_of.update({row: [] for row in rows})
            if batch:
                rows, tokens, _ = batch.step()
                for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
                    tokens_of[row].append(token)
            step += 1
    out = {"slots": slots}
    for i, rows in rows_of.items():
        out[i] = tokens_of[rows[0]]
        out.update({(i, c): tokens_of[row] for c, row in enumerate(rows) if c})
    return out


@pytest.mark.parametrize("schedule", [
    {0: [("add", [0])], 1: [("add", [1])], 3: [("add", [2, 3])], 6: [("add", [4])], 7: [("add", [5])]},
    {0: [("add", [3, 1])], 2: [("add", [4, 0])], 5: [("add", [2])], 9: [("add", [5])]},
    {0: [("add", [0, 1, 2, 3, 4, 5])]},  # no join: the left-padded batch as generate decodes it
], ids=["one-by-one", "in-pairs", "all-at-once"])
def test_rows_joining_at_any_step_equal_each_alone(pipe, requests, schedule):
    got = run(pipe, requests, schedule)
    for i, request in enumerate(requests):
        want = alone(pipe, request)
        assert got[i] == want, f"request {i} ({request[1]!r})"
    assert len({tuple(got[i]) for i in range(len(requests))}) == len(requests)  # lively: a mix-up would show


def test_a_prompt_longer_than_the_slots_in_use_opens_slots_at_the_front(pipe, requests):
    # "Hi" starts alone; one step later the three-image prompt, longer than the slots written so far, joins: the
    # cache moves every row right to make room, and both still decode exactly what they decode alone.
    short, long = requests[3], requests[4]
    T_short = pipe.encode([short[0]], [short[1]])[0].size(1)
    T_long = pipe.encode([long[0]], [long[1]])[0].size(1)
    assert T_long > T_short + 1
    got = run(pipe, [short, long], {0: [("add", [0])], 1: [("add", [1])]})
    assert got["slots"] == [T_short, T_long]  # the next slot after the join is the long prompt's end
    assert got[0] == alone(pipe, short) and got[1] == alone(pipe, long)


def test_the_slots_move_left_when_the_cache_is_short_of_room(pipe, requests):
    # A long prompt answers 3 tokens; "Hi" joins it (room enough: the slots stay put). Once the long row has left,
    # another prompt joins, but the cache lacks room after the slot in use: the slots before "Hi"'s first token are
    # dropped (everything moves left) and both still decode exactly what they decode alone.
    x, y, z = requests[4][:2] + (3,), requests[3][:2] + (10,), requests[1][:2] + (10,)
    Lx, Ly, Lz = (pipe.encode([r[0]], [r[1]])[0].size(1) for r in (x, y, z))
    capacity = Lx + 11
    slot = max(Lz, Ly + 4)  # the slots "Hi" uses after 4 steps
    assert slot + 10 <= capacity
    got = run(pipe, [x, y, z], {0: [("add", [0])], 1: [("add", [1])], 5: [("add", [2])]}, capacity=capacity)
    assert got["slots"] == [Lx, Lx + 1, slot] and slot < Lx + 5
    assert [got[0], got[1], got[2]] == [alone(pipe, x), alone(pipe, y), alone(pipe, z)]


def test_rows_finished_early_leave_and_the_rest_decode_on(pipe, requests):
    # Rows finished by the caller leave; others join in their place.
    schedule = {
        0: [("add", [0, 2])], 2: [("add", [1])], 3: [("finish", [0])], 4: [("add", [5])], 5: [("finish", [1])],
        6: [("add", [3])],
    }
    got = run(pipe, requests, schedule)
    assert got[0] == alone(pipe, requests[0])[:3] and got[1] == alone(pipe, requests[1])[:3]
    for i in (2, 3, 5):
        assert got[i] == alone(pipe, requests[i]), f"request {i}"


def test_finished_rows_leave_the_cache(lively, pipeline, requests):
    with ContinuousBatch(lively, GenerationConfig(), capacity=128) as batch:
        ids, mask, pixels = pipeline.encode([r[0] for r in requests[:3]], [r[1] for r in requests[:3]])
        rows = batch.add(ids, mask, pixels, max_new_tokens=[12, 2, 12])
        batch.step()
        batch.finish([rows[0]])
        assert len(batch) == 2
        got, _, ended = batch.step()  # the finished row is not decoded; row 1 reaches its max_new_tokens
        assert got.tolist() == rows[1:] and ended.tolist() == [True, False]
        batch.step()
        assert len(batch) == 1 and lively.decoder.h[0].attn.kv_cache.k.size(0) == 1  # both left the cache
    assert lively.decoder.kv_cache_length == 0  # closing freed it


def test_per_row_limits_and_stop_strings(lively, pipeline, requests):
    tok = pipeline.tokenizer
    # A stop string that row 0 writes: the text of its 4th and 5th tokens.
    free = alone(pipeline, requests[0])
    stop = tok.decode(free[3:5])
    assert stop.strip() and stop not in tok.decode(free[:4])
    with ContinuousBatch(lively, GenerationConfig(), capacity=128, tokenizer=tok) as batch:
        ids, mask, pixels = pipeline.encode([requests[0][0], requests[1][0]], [requests[0][1], requests[1][1]])
        rows = batch.add(ids, mask, pixels, max_new_tokens=[12, 7], stop_strings=[[stop], None])
        out = {row: [] for row in rows}
        while batch:
            got, tokens, _ = batch.step()
            for row, token in zip(got.tolist(), tokens.tolist(), strict=True):
                out[row].append(token)
    assert out[rows[0]] == alone(pipeline, requests[0], stop_strings=[stop], tokenizer=tok) == free[:5]
    assert out[rows[1]] == alone(pipeline, requests[1][:2] + (7,))


def test_prompts_that_do_not_fit_wait_for_room(lively, pipeline, requests):
    first, second = requests[0], requests[1]
    T_first = pipeline.encode([first[0]], [first[1]])[0].size(1)
    T_second = pipeline.encode([second[0]], [second[1]])[0].size(1)
    capacity = T_first + 12
    with ContinuousBatch(lively, GenerationConfig(), capacity=capacity) as batch:
        batch.add(*pipeline.encode([first[0]], [first[1]]), max_new_tokens=12)
        batch.step()
        # The running row needs its slots up to the end of the cache: nothing more with 12 tokens fits beside it.
        assert not batch.fits(T_second, 12)
        ids, mask, _ = pipeline.encode([None], [second[1]])
        with pytest.raises(ValueError, match="do not fit"):
            batch.add(ids, mask, max_new_tokens=12)
        assert batch.fits(T_second, 2)  # a short answer does
        while batch:
            batch.step()
        assert batch.fits(T_second, 12)  # an empty batch starts a new decode
        rows = batch.add(ids, mask, max_new_tokens=12)
        tokens = [int(batch.step()[1]) for _ in range(12)]
    assert rows == [1] and tokens == alone(pipeline, second[:2] + (12,))


def test_copies_per_prompt_join_together(lively, pipeline, requests):
    # Sampling with top_k=1 picks the argmax: every copy of a prompt must then be its greedy answer alone.
    schedule = {0: [("add", [0])], 2: [("add", [2, 3])]}
    got = run(pipeline, requests, schedule, do_sample=True, top_k=1, num_return_sequences=2)
    for i in (0, 2, 3):
        assert got[i] == got[(i, 1)] == alone(pipeline, requests[i]), f"request {i}"


def test_without_the_kv_cache_rows_join_only_an_empty_batch(lively, pipeline, requests):
    with ContinuousBatch(lively, GenerationConfig(use_cache=False), capacity=128) as batch:
        ids, mask, pixels = pipeline.encode([requests[1][0]], [requests[1][1]])
        batch.add(ids, mask, pixels, max_new_tokens=3)
        batch.step()
        assert not batch.fits(ids.size(1), 3)
        while batch:
            batch.step()
        assert batch.fits(ids.size(1), 3)
