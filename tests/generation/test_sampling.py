"""Generation: KV cache vs full recompute, batched vs one-by-one, sampling, eos and length limits."""

from __future__ import annotations

import pytest
import torch

from mmgpt.generation.engine import build_attention_mask, generate, sample

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


def test_build_attention_mask():
    key_valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    m = build_attention_mask(key_valid, torch.arange(4))  # (2, 1, 4, 4)
    assert m.shape == (2, 1, 4, 4)
    assert m[1, 0].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    # Padded row: real queries see real keys causally; a pad query sees only itself (no empty softmax row).
    assert m[0, 0].tolist() == [
        [True, False, False, False],
        [False, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ]


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


# ---------------------------------------------------------------------------------------------------------
# sample()


@pytest.fixture
def logits():
    return torch.randn(16, 50, generator=torch.Generator().manual_seed(0))


def test_greedy_is_argmax(logits):
    assert torch.equal(sample(logits), logits.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_argmax(logits):
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample(logits, do_sample=True, top_k=1, generator=g), logits.argmax(-1))
        assert torch.equal(sample(logits, do_sample=True, top_p=1e-6, generator=g), logits.argmax(-1))


def test_top_k_restricts_support(logits):
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, do_sample=True, top_k=3, temperature=5.0, generator=g) for _ in range(50)])
    top3 = logits.topk(3, dim=-1).indices  # (16, 3)
    assert (draws[..., None] == top3).any(-1).all()
    assert len(draws.unique()) > 16  # several of the three per row actually get drawn


@pytest.mark.parametrize(
    "top_p,support", [(0.45, {0}), (0.7, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, support):
    # Probabilities 0.5, 0.3, 0.15, 0.05: {0, 1} holds 0.8, so it is the nucleus for any top_p in (0.5, 0.8].
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, do_sample=True, top_p=top_p, generator=g).tolist()) == support


def test_seeded_sampling_reproducible(logits):
    def draw(seed):
        return sample(logits, do_sample=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert any(not torch.equal(draw(0), draw(s)) for s in range(1, 5))


def test_sampling_follows_temperature():
    logits = torch.tensor([[2.0, 0.0]]).expand(20000, 2)
    g = torch.Generator().manual_seed(0)
    for t in (0.5, 1.0, 3.0):
        p0 = torch.softmax(torch.tensor([2.0, 0.0]) / t, 0)[0]
        freq = (sample(logits, do_sample=True, temperature=t, generator=g) == 0).float().mean()
        assert abs(freq - p0) < 0.02
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(logits, do_sample=True, temperature=0.0)


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
