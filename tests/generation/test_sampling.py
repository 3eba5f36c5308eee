"""The sampling functions against HF's logits warpers: greedy, top-k, top-p, min-p, temperature,
repetition penalty."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmgpt.generation.sampling import apply_repetition_penalty, sample, warp_logits


@pytest.fixture
def logits():
    return torch.randn(16, 50, generator=torch.Generator().manual_seed(0))


def test_greedy_is_argmax(logits):
    assert torch.equal(sample(logits), logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_breaks_ties_and_nans_as_argmax(dtype):
    """Greedy takes the first maximum, and a NaN, where argmax does (it uses max(dim), which is faster on a CPU)."""
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor([[1.0, 3.0, 3.0, 0.0], [nan, 1.0, 5.0, 5.0], [2.0, nan, 9.0, nan], [-inf] * 4], dtype=dtype)
    ties = torch.randint(0, 3, (8, 49152), generator=torch.Generator().manual_seed(0)).to(dtype)
    for x in (rows, ties):
        assert torch.equal(sample(x), x.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_argmax(logits):
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample(logits, do_sample=True, top_k=1, generator=g), logits.argmax(-1))
        assert torch.equal(sample(logits, do_sample=True, top_p=1e-6, generator=g), logits.argmax(-1))


def test_top_p_below_float32_keeps_the_most_likely_token(logits):
    # 1e-300 is 0 in float32: every token's preceding mass reaches it, and only the rule that the most likely
    # token stays keeps a token at all.
    for top_p in (1e-300, 5e-324):
        warped = warp_logits(logits, top_k=None, top_p=top_p)
        assert torch.equal(torch.isfinite(warped), logits == logits.amax(-1, keepdim=True))
        g = torch.Generator().manual_seed(0)
        assert torch.equal(sample(logits, do_sample=True, top_k=None, top_p=top_p, generator=g), logits.argmax(-1))


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


def test_warp_logits_matches_hf_warpers():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p, min_p in [(0.7, 50, 1.0, None), (1.3, 10, 0.8, None), (1.0, 0, 0.5, 0.1),
                                             (2.0, 30, 0.95, 0.2), (0.5, None, 1.0, 0.3)]:
        hf = [TemperatureLogitsWarper(temperature)]
        hf += [TopKLogitsWarper(top_k)] if top_k else []
        hf += [TopPLogitsWarper(top_p)] if top_p < 1 else []
        hf += [MinPLogitsWarper(min_p)] if min_p else []
        expected = LogitsProcessorList(hf)(None, logits.clone())
        ours = warp_logits(logits, temperature, top_k, top_p, min_p)
        assert torch.equal(ours.isinf(), expected.isinf())
        kept = (~ours.isinf()).sum(-1)
        assert (kept < 100).all() and (kept > 1).any()  # the filters removed some tokens, not all
        torch.testing.assert_close(ours[~ours.isinf()], expected[~expected.isinf()])


def test_repetition_penalty_matches_hf():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    ours = apply_repetition_penalty(logits, seen, 1.7)
    torch.testing.assert_close(ours, expected)
    assert not torch.equal(ours, logits)


def test_min_p_keeps_tokens_near_the_best():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    # min_p 0.5: keep tokens with p >= 0.25, i.e. tokens 0 and 1, in proportion 5:3.
    draws = sample(logits, do_sample=True, top_k=None, min_p=0.5, generator=g)
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean() - 0.625) < 0.03
