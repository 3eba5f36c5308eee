"""Beam search against exhaustive search and HF's own, batched against one by one."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import TINY_PROJECTOR, TINY_VISION, make_lively, mixed_requests
from transformers import LlamaForCausalLM

from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.hf_llama import to_hf_llama_config, to_hf_llama_state_dict
from mmgpt.generation.engine import generate
from mmgpt.models.mmgpt import MMGPT

# Prompts with no image, one, two and three images, of different lengths.


def toy_model(seed: int, vocab_size: int = 5) -> MMGPT:
    # A vocabulary small enough to enumerate every continuation.
    config = MMGPTConfig(
        VisionConfig(**TINY_VISION), ProjectorConfig(**TINY_PROJECTOR),
        DecoderConfig(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16),
        image_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    return make_lively(MMGPT(config), seed)


def exhaustive_best(model, prompt: list[int], n: int, eos: int, length_penalty: float) -> list[int]:
    """The continuation (ending at its first eos, or after n tokens) with the best length-normalized log-prob."""
    V = model.config.decoder.vocab_size
    candidates = {tuple(s[: s.index(eos) + 1] if eos in s else s) for s in itertools.product(range(V), repeat=n)}
    best, best_score = None, -math.inf
    with torch.no_grad():
        for c in sorted(candidates):
            # The decoder alone: a sampled <image> id is an ordinary token to it, not a placeholder.
            logp = model.decoder(torch.tensor([prompt + list(c)]))[0].log_softmax(-1)
            total = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(c))
            score = total / len(c) ** length_penalty
            if score > best_score:
                best, best_score = list(c), score
    return best


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -1.0, 2.0])
def test_beam_search_equals_exhaustive_search(length_penalty):
    V, N, eos, pad = 5, 3, 1, 0
    prompts = [[2, 3, 0, 2, 2], [3, 0]]
    ids = torch.tensor([[2, 3, 0, 2, 2], [pad, pad, pad, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    differs_from_greedy = 0
    for seed in range(3):
        model = toy_model(seed)
        # Enough beams that nothing is pruned ((V-1)^(N-1) open prefixes x V tokens), and "never" stops only
        # when no open beam can win: beam search must then find the exhaustive optimum.
        beams = generate(model, ids, mask, max_new_tokens=N, num_beams=V * (V - 1) ** (N - 1), eos_token_id=eos,
                         pad_token_id=pad, length_penalty=length_penalty, early_stopping="never")
        greedy = generate(model, ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=pad)
        for row, prompt in enumerate(prompts):
            best = exhaustive_best(model, prompt, N, eos, length_penalty)
            assert beams[row].tolist() == best + [pad] * (N - len(best)), (seed, row)
            differs_from_greedy += beams[row].tolist() != greedy[row].tolist()
    assert differs_from_greedy  # the search beats greedy somewhere, so it is not greedy in disguise


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,n_return", [
    (2, 1.0, False, 1), (3, 0.5, True, 2), (4, 1.0, "never", 3), (3, -0.5, False, 3),
])
def test_beam_search_matches_hf(tiny_config, num_beams, length_penalty, early_stopping, n_return):
    tiny_config.decoder.vocab_size = 24
    model = make_lively(MMGPT(tiny_config), seed=1)
    hf = LlamaForCausalLM(to_hf_llama_config(tiny_config.decoder)).eval()
    hf.load_state_dict(to_hf_llama_state_dict(model.decoder.state_dict(), tiny_config.decoder), strict=False)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    kw = dict(max_new_tokens=6, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
              num_return_sequences=n_return, eos_token_id=[3, 4])
    # pad_token_id 2, not 0: HF fills finished beams with `pad_token_id or eos_token_id[0]`.
    ours = generate(model, ids, mask, pad_token_id=2, **kw)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=2, **kw)[:, 5:]
    theirs = torch.nn.functional.pad(theirs, (0, 6 - theirs.size(1)), value=2)  # HF crops to the longest
    assert torch.equal(ours, theirs)
    assert (ours == 3).any() or (ours == 4).any()  # some beam ended at an eos


def test_batched_beam_search_equals_one_by_one(engine, images):
    model, pipe = engine
    requests = mixed_requests(images)
    ids, mask, pixels = pipe.encode(*requests)
    beams = generate(model, ids, mask, pixels, max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert beams.shape == (8, 8)
    for i, request in enumerate(zip(*requests, strict=True)):
        alone = generate(model, *pipe.encode(*map(list, zip(request, strict=True))), max_new_tokens=8, num_beams=3,
                         num_return_sequences=2)
        assert torch.equal(alone, beams[2 * i : 2 * i + 2])
