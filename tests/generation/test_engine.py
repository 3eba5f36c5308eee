"""The decode engine: KV cache vs full recompute, batched vs one-by-one (left padding), HF Llama's greedy
output, eos and stop strings, finished rows leaving the batch, sampling, streaming steps, the compiled step."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_lively, make_lively, mixed_requests, scripted
from transformers import LlamaForCausalLM

from mmgpt.convert.hf_llama import to_hf_llama_config, to_hf_llama_state_dict
from mmgpt.generation.decode_state import compile_decode_step, decode_step
from mmgpt.generation.engine import generate, stream_tokens
from mmgpt.models.mmgpt import MMGPT


def test_batched_equals_one_by_one_for_image_mixes(engine, images):
    model, pipe = engine
    requests = mixed_requests(images)
    ids, mask, pixels = pipe.encode(*requests)
    assert pixels.shape[0] == 6 and (mask == 0).any()  # 2 + 0 + 1 + 3 images, left padding
    batched = generate(model, ids, mask, pixels, max_new_tokens=10)
    assert_lively(batched)
    for i, (image, prompt) in enumerate(zip(*requests, strict=True)):
        alone = generate(model, *pipe.encode([image], [prompt]), max_new_tokens=10)
        assert torch.equal(alone[0], batched[i]), f"row {i} ({prompt!r})"
    # The number of images matters: the first prompt with only its first image writes something else.
    one = generate(model, *pipe.encode([images[0]], [requests[1][0]]), max_new_tokens=10)
    assert not torch.equal(one[0], batched[0])


@pytest.mark.parametrize("kwargs", [
    {},
    {"repetition_penalty": 1.5},
    {"do_sample": True, "temperature": 1.5, "top_k": 20, "top_p": 0.9, "min_p": 0.05},
], ids=["greedy", "repetition-penalty", "sampling"])
def test_cached_equals_uncached(engine, images, kwargs):
    model, pipe = engine
    ids, mask, pixels = pipe.encode(*mixed_requests(images))

    def run(use_cache):
        g = torch.Generator().manual_seed(0)
        return generate(model, ids, mask, pixels, max_new_tokens=12, generator=g, use_cache=use_cache, **kwargs)

    cached = run(True)
    assert_lively(cached)
    assert torch.equal(cached, run(False))


def test_left_padded_batch_matches_hf_llama_greedy(tiny_config):
    # Text-only rows through the native decoder against HF LlamaForCausalLM.generate with the same weights.
    model = make_lively(MMGPT(tiny_config))
    hf = LlamaForCausalLM(to_hf_llama_config(tiny_config.decoder)).eval()
    hf.load_state_dict(to_hf_llama_state_dict(model.decoder.state_dict(), tiny_config.decoder), strict=False)
    ids = torch.tensor([[0, 0, 7, 8, 9], [10, 11, 12, 13, 14]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    ours = generate(model, ids, mask, max_new_tokens=8)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs[:, 5:])


def test_repetition_penalty_in_generation(lively, pipeline):
    ids, mask, _ = pipeline.encode([None], ["What is one plus one?"])
    free = generate(lively, ids, mask, max_new_tokens=20)[0].tolist()
    assert len(set(free)) < 20  # left alone the model repeats tokens
    penalized = generate(lively, ids, mask, max_new_tokens=20, repetition_penalty=1e6)[0].tolist()
    assert len(set(penalized)) == 20  # an overwhelming penalty never picks a seen token again
    assert not set(penalized) & set(ids[0].tolist())  # not the prompt's tokens either


def test_seeded_sampling_is_reproducible_and_num_return_sequences(lively, pipeline, images):
    ids, mask, pixels = pipeline.encode([images[0], None], ["Describe the image.", "Hi"])
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, num_return_sequences=3)

    def run(seed):
        return generate(lively, ids, mask, pixels, generator=torch.Generator().manual_seed(seed), **kw)

    first = run(0)
    assert first.shape == (6, 10)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
    assert len({tuple(r) for r in first[:3].tolist()}) == 3  # one prompt's samples differ
    # Through the pipeline: the seed argument, and a list of n strings per prompt.
    texts = pipeline.generate([images[0], None], ["Describe the image.", "Hi"], seed=0, **kw)
    assert len(texts) == 2 and all(len(t) == 3 for t in texts)
    assert pipeline.generate([images[0], None], ["Describe the image.", "Hi"], seed=0, **kw) == texts
    with pytest.raises(ValueError, match="num_return_sequences > 1 needs do_sample"):
        generate(lively, ids, mask, pixels, num_return_sequences=2)


def test_stop_string_stops_the_row(tokenizer, tiny_config):
    pipe = scripted(tokenizer, "red circle. STOP blue", tiny_config)
    ids, mask, _ = pipe.encode([None, None], ["Hi", "A longer question here?"])
    out = generate(pipe.model, ids, mask, max_new_tokens=12, stop_strings=["STOP"], tokenizer=tokenizer,
                   pad_token_id=-1)
    script = tokenizer("red circle. STOP", add_special_tokens=False)["input_ids"]
    for row in out.tolist():  # both rows stop at the token that completes "STOP"; the rest is padding
        assert row == script + [-1] * (12 - len(script))


def test_finished_rows_leave_the_batch(lively, pipeline, images):
    ids, mask, pixels = pipeline.encode([images[0], None, images[1]], ["Describe the image.", "Hi", "Hello there"])
    free = generate(lively, ids, mask, pixels, max_new_tokens=12)
    eos = int(free[1, 3])  # row 1 emits it at step 3
    batch_sizes = []  # rows in each decoder call: the prefill, then one per step
    hook = lively.decoder.h[0].register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].size(0)))
    try:
        out = generate(lively, ids, mask, pixels, max_new_tokens=12, eos_token_id=[eos], pad_token_id=-1)
    finally:
        hook.remove()
    first_hit = [int((r == eos).nonzero()[0]) if (r == eos).any() else 12 for r in free]
    for row, hit in zip(out, first_hit, strict=True):  # each row as before up to its eos, then padding
        assert (row[hit + 1 :] == -1).all()
    assert torch.equal(out[1, :4], free[1, :4])
    # The decoder ran the full batch until the first row finished, and fewer rows afterwards.
    first = min(first_hit)
    assert batch_sizes[: first + 1] == [3] * (first + 1)
    assert batch_sizes[first + 1] < 3


@pytest.mark.slow
def test_compiled_decode_step_equals_eager(lively, pipeline, images):
    ids, mask, pixels = pipeline.encode(*mixed_requests(images))
    eager = generate(lively, ids, mask, pixels, max_new_tokens=10)
    eos = int(eager[2, 4])
    assert torch.equal(generate(lively, ids, mask, pixels, max_new_tokens=10, compile=True), eager)
    for kw in [{"eos_token_id": eos}, {"num_beams": 3, "num_return_sequences": 2}]:
        assert torch.equal(
            generate(lively, ids, mask, pixels, max_new_tokens=10, compile=True, **kw),
            generate(lively, ids, mask, pixels, max_new_tokens=10, **kw),
        )


def test_each_model_compiles_a_decode_step_of_its_own():
    # Dynamo keeps graphs per code object, and runs eagerly past recompile_limit (8) of them: one decode_step shared
    # by every model would do so from about the fifth model (a benchmark sweep, a server with several models).
    steps = [compile_decode_step(), compile_decode_step()]
    codes = [step._torchdynamo_orig_callable.__code__ for step in steps]
    assert codes[0] is not codes[1] and all(code is not decode_step.__code__ for code in codes)
    assert codes[0] == decode_step.__code__  # the same function otherwise


def test_stream_tokens_yields_rows_and_stops(lively, pipeline):
    ids, mask, _ = pipeline.encode([None, None], ["Hi", "What is one plus one?"])
    free = generate(lively, ids, mask, max_new_tokens=6)
    eos = next(t for t in free[0].tolist() if t not in free[1].tolist())  # ends row 0 only
    first = free[0].tolist().index(eos)
    steps = list(stream_tokens(lively, ids, mask, max_new_tokens=6, eos_token_id=eos))
    assert len(steps) == 6
    assert [rows.tolist() for rows, _ in steps] == [[0, 1]] * (first + 1) + [[1]] * (5 - first)
    assert [int(tokens[-1]) for _, tokens in steps] == free[1].tolist()
    assert [int(tokens[0]) for _, tokens in steps[: first + 1]] == free[0, : first + 1].tolist()


PROMPTS = ["Describe the image.", "What is one plus one?", "What color is the circle?", "Hi"]


@pytest.fixture
def requests(images):
    # Image rows and text rows, of different lengths, interleaved.
    return [images[0], None, images[1], None], PROMPTS


def test_cached_equals_uncached_mixed_left_padded_batch(lively, pipeline, requests):
    ids, mask, pixels = pipeline.encode(*requests)
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # left-padded, rows of different lengths
    cached = generate(lively, ids, mask, pixels, max_new_tokens=12)
    full = generate(lively, ids, mask, pixels, max_new_tokens=12, use_cache=False)
    assert cached.shape == (4, 12)
    assert torch.equal(cached, full)
    # The comparison has teeth: rows differ from each other and are not one repeated token.
    assert len({tuple(r) for r in cached.tolist()}) == 4
    assert all(len(set(r)) > 3 for r in cached.tolist())
    assert lively.decoder.kv_cache_length == 0  # the cache is freed after generation


def test_batched_equals_one_by_one(lively, pipeline, requests):
    ids, mask, pixels = pipeline.encode(*requests)
    batched = generate(lively, ids, mask, pixels, max_new_tokens=10)
    for i, (image, prompt) in enumerate(zip(*requests, strict=True)):
        one_ids, one_mask, one_pixels = pipeline.encode([image], [prompt])
        assert one_mask.all()  # alone, a row has no padding
        alone = generate(lively, one_ids, one_mask, one_pixels, max_new_tokens=10)
        assert torch.equal(alone[0], batched[i]), f"row {i} ({prompt!r})"


def test_padding_is_masked_out(lively, pipeline, requests):
    # Garbage in the pad slots must not change anything: they are masked, not merely "pad tokens".
    ids, mask, pixels = pipeline.encode(*requests)
    noisy = ids.masked_fill(mask == 0, 400)
    assert not torch.equal(noisy, ids)
    assert torch.equal(
        generate(lively, noisy, mask, pixels, max_new_tokens=6), generate(lively, ids, mask, pixels, max_new_tokens=6)
    )


def test_eos_stops_a_row_and_pads_the_rest(lively, pipeline, requests, tokenizer):
    ids, mask, pixels = pipeline.encode(*requests)
    free = generate(lively, ids, mask, pixels, max_new_tokens=12)
    eos = int(free[0, 2])  # a token row 0 emits at step 2 plays eos
    pad = tokenizer.pad_token_id
    stopped = generate(lively, ids, mask, pixels, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    expected = free.clone()
    for row in expected:
        hits = (row == eos).nonzero()
        if len(hits):
            row[int(hits[0]) + 1 :] = pad  # everything after the first eos is padding
    assert torch.equal(stopped, expected)
    assert (stopped[0, 3:] == pad).all() and not (free[0, 3:] == pad).all()
    assert (expected != free).any(dim=1).sum() < 4  # some row ran on untouched

    # When every row stops, the loop ends early and the remaining columns are padding.
    one = generate(lively, ids[:1], mask[:1], pixels[:1], max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(one[0], expected[0])


def test_block_size_overflow_raises(model, pipeline, requests):
    ids, mask, pixels = pipeline.encode(*requests)
    T = ids.size(1)
    with pytest.raises(ValueError, match=rf"prompt \({T} tokens.*\+ max_new_tokens \({129 - T}\).*block_size=128"):
        generate(model, ids, mask, pixels, max_new_tokens=129 - T)


def test_seeded_sampling_through_generate(lively, pipeline, requests):
    ids, mask, pixels = pipeline.encode(*requests)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(lively, ids, mask, pixels, max_new_tokens=8, do_sample=True, temperature=2.0, generator=g)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.gpu
def test_cuda_generation_matches_cpu(lively, pipeline, requests):
    ids, mask, pixels = pipeline.encode(*requests)
    with torch.no_grad():
        cpu_logits = lively(ids, pixels)
    cpu = generate(lively, ids, mask, pixels, max_new_tokens=8)
    lively.cuda()
    ids, mask, pixels = ids.cuda(), mask.cuda(), pixels.cuda()
    with torch.no_grad():
        torch.testing.assert_close(lively(ids, pixels).cpu(), cpu_logits, atol=1e-4, rtol=1e-4)
    cached = generate(lively, ids, mask, pixels, max_new_tokens=8)
    assert torch.equal(cached, generate(lively, ids, mask, pixels, max_new_tokens=8, use_cache=False))
    assert torch.equal(cached.cpu(), cpu)


# Prompts with no image, one, two and three images, of different lengths.


