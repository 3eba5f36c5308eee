"""Attention masks (causal, padding, prefix-LM) and the written-out single-query attention of a decode step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_lively

from mmgpt.models.attention import build_attention_mask
from mmgpt.models.decoder import single_query_attention
from mmgpt.models.mmgpt import MMGPT


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


def test_prefix_mask():
    # Row 0: one padding slot, prefix = slots 1..2 (ends at 3); row 1: no padding, prefix = slots 0..2.
    key_valid = torch.tensor([[False, True, True, True, True], [True, True, True, True, True]])
    m = build_attention_mask(key_valid, torch.arange(5), prefix_end=3)
    assert m.shape == (2, 1, 5, 5)
    assert m[1, 0].int().tolist() == [
        [1, 1, 1, 0, 0],  # the prefix sees the whole prefix, both ways
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],  # the answer is causal
        [1, 1, 1, 1, 1],
    ]
    assert m[0, 0].int().tolist() == [
        [1, 1, 1, 0, 0],  # a padding query (output unused) sees itself, so no softmax row is empty
        [0, 1, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 1, 1, 1, 1],
    ]
    # Per-row prefix ends (right-padded training rows).
    m = build_attention_mask(torch.ones(2, 4, dtype=torch.bool), torch.arange(4), prefix_end=torch.tensor([1, 3]))
    assert m[0, 0, 0].int().tolist() == [1, 0, 0, 0] and m[1, 0, 0].int().tolist() == [1, 1, 1, 0]


def test_prefix_lm_future_answer_cannot_leak_but_prompt_is_bidirectional(tiny_config):
    def logits(attention, ids, prefix):
        tiny_config.decoder.attention = attention
        model = make_lively(MMGPT(tiny_config))
        with torch.no_grad():
            return model(ids, prefix_lengths=torch.tensor([prefix]))[0]

    P = 6  # prompt tokens; the answer follows
    ids = torch.randint(10, 400, (1, 10), generator=torch.Generator().manual_seed(0))
    answer_changed = ids.clone()
    answer_changed[0, P + 2] = 7
    prompt_changed = ids.clone()
    prompt_changed[0, P - 1] = 7
    base = logits("prefix", ids, P)
    # A future answer token changes nothing before it: not the prompt, not the earlier answer.
    torch.testing.assert_close(logits("prefix", answer_changed, P)[: P + 2], base[: P + 2], rtol=0, atol=0)
    assert not torch.allclose(logits("prefix", answer_changed, P)[P + 2 :], base[P + 2 :])
    # The last prompt token changes the first prompt position: the prompt sees itself both ways...
    assert not torch.allclose(logits("prefix", prompt_changed, P)[0], base[0])
    # ...which causal attention never allows.
    causal = logits("causal", ids, P)
    torch.testing.assert_close(logits("causal", prompt_changed, P)[: P - 1], causal[: P - 1], rtol=0, atol=0)


@pytest.mark.parametrize("rows", [3, 1], ids=["matmuls", "summed-products"])
@pytest.mark.parametrize("n_query_groups", [4, 2, 1])
def test_single_query_attention_equals_sdpa(n_query_groups, rows):
    # The decode step's written-out attention (both of its forms) against SDPA, for MHA, GQA and MQA, both mask kinds.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 4, 1, 8, generator=g)
    k, v = torch.randn(2, rows, n_query_groups, 7, 8, generator=g)
    mask = torch.rand(rows, 1, 1, 7, generator=g) > 0.3
    mask[..., -1] = True
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_query_groups != 4)
    for m in (mask, additive):
        torch.testing.assert_close(single_query_attention(q, k, v, m), expected, atol=1e-6, rtol=1e-5)
    unmasked = F.scaled_dot_product_attention(q, k, v, enable_gqa=n_query_groups != 4)
    torch.testing.assert_close(single_query_attention(q, k, v, None), unmasked, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(unmasked, expected)
