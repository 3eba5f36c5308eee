"""The native decoder against HF ``LlamaForCausalLM`` (the oracle), its KV cache, masks and config checks."""

from __future__ import annotations

import pytest
import torch
from conftest import RANDOM_DECODER, random_decoder
from transformers import LlamaForCausalLM

from mmgpt.config import DecoderConfig
from mmgpt.convert.hf_llama import (
    from_hf_llama_config,
    from_hf_llama_state_dict,
    to_hf_llama_config,
    to_hf_llama_state_dict,
)
from mmgpt.models.decoder import Decoder

VOCAB = RANDOM_DECODER["vocab_size"]


def hf_copy(decoder: Decoder) -> LlamaForCausalLM:
    config = decoder.config
    # eager attention: an implementation independent of the SDPA call the native decoder uses.
    hf = LlamaForCausalLM(to_hf_llama_config(config, attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(to_hf_llama_state_dict(decoder.state_dict(), config), strict=False)
    # A tied lm_head is the embedding itself, so it is the one key the converted dict may leave out.
    assert missing == (["lm_head.weight"] if config.tie_embeddings else []) and unexpected == []
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == config.tie_embeddings
    return hf


ARCHS = pytest.mark.parametrize(
    "n_query_groups,tie_embeddings",
    [(4, True), (4, False), (2, True), (1, False)],
    ids=["mha-tied", "mha-untied", "gqa-tied", "mqa-untied"],
)


@ARCHS
def test_logits_match_hf_llama(n_query_groups, tie_embeddings):
    decoder = random_decoder(n_query_groups=n_query_groups, tie_embeddings=tie_embeddings)
    hf = hf_copy(decoder)
    idx = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = decoder(idx), hf(idx).logits
    assert ours.shape == (2, 17, VOCAB)
    assert ours.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@ARCHS
def test_hf_conversion_round_trips_exactly(n_query_groups, tie_embeddings):
    decoder = random_decoder(n_query_groups=n_query_groups, tie_embeddings=tie_embeddings)
    config = decoder.config
    assert from_hf_llama_config(to_hf_llama_config(config)) == config
    original = decoder.state_dict()
    back = from_hf_llama_state_dict(to_hf_llama_state_dict(original, config), config)
    assert back.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(back[k], v), k
    # And from HF's side: a Llama built by transformers converts to a native decoder with the same logits.
    hf = hf_copy(decoder)
    native = Decoder(from_hf_llama_config(hf.config)).eval()
    native.load_state_dict(from_hf_llama_state_dict(hf.state_dict(), native.config))
    idx = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(native(idx), decoder(idx))


@pytest.mark.parametrize("n_query_groups", [4, 2])
def test_kv_cached_decode_equals_full_forward(n_query_groups):
    decoder = random_decoder(n_query_groups=n_query_groups)
    B, T, prefill = 2, 12, 5
    idx = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = decoder(idx)  # (B, T, V)
        decoder.set_kv_cache(B, max_seq_length=T)
        steps = [decoder(idx[:, :prefill], input_pos=torch.arange(prefill))]
        for t in range(prefill, T):
            steps.append(decoder(idx[:, t : t + 1], input_pos=torch.tensor([t])))
        decoder.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_explicit_causal_mask_equals_default():
    decoder = random_decoder()
    T = 10
    idx = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T)
    with torch.no_grad():
        default, explicit = decoder(idx), decoder(idx, attn_mask=causal)
        # A full (non-causal) mask must differ, or the check above would pass for a mask that is ignored.
        full = decoder(idx, attn_mask=torch.ones_like(causal))
    torch.testing.assert_close(explicit, default, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(full[:, :-1], default[:, :-1], atol=1e-3)


def test_position_beyond_block_size_raises():
    decoder = random_decoder(block_size=16)
    with pytest.raises(ValueError, match=r"position 16 is beyond decoder.block_size=16"):
        decoder(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size=16"):
        decoder(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([[15, 16]]))
    with pytest.raises(ValueError, match="exceeds decoder.block_size=16"):
        decoder.set_kv_cache(1, max_seq_length=17)
    assert decoder(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, VOCAB)  # exactly block_size is fine


def test_input_pos_without_cache_raises():
    decoder = random_decoder()
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        decoder(torch.zeros(1, 3, dtype=torch.long), input_pos=torch.arange(3))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(n_embd=30, n_head=4), r"n_embd=30 must be divisible by decoder.n_head=4"),
        (dict(n_embd=32, n_head=4, n_query_groups=3), r"n_head=4 must be divisible by decoder.n_query_groups=3"),
        (dict(n_embd=12, n_head=4), r"head size 3 must be even"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecoderConfig(vocab_size=VOCAB, **kwargs)


def test_config_derived_fields_and_unset_vocab():
    config = DecoderConfig(n_embd=96, n_head=4)
    assert config.n_query_groups == 4
    assert config.intermediate_size == 256  # 8 * 96 / 3 = 256, already a multiple of 16
    assert DecoderConfig(n_embd=32, n_head=4).intermediate_size == 96  # 85.3 rounded up to 16
    with pytest.raises(ValueError, match="vocab_size is not set"):
        Decoder(config)
