"""The generation engine: batching mixes, cache, sampling filters against HF, beam search against exhaustive
search and HF, stop strings, streaming, the image-embedding cache, finished rows, and the prefix-LM mode."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_PROJECTOR, TINY_VISION, make_lively
from transformers import LlamaForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.hf_llama import to_hf_llama_config, to_hf_llama_state_dict
from mmgpt.data.collate import Collator
from mmgpt.data.sample import Sample
from mmgpt.generation.engine import (
    _Batch,
    apply_repetition_penalty,
    build_attention_mask,
    generate,
    sample,
    stream_tokens,
    warp_logits,
)
from mmgpt.models.decoder import single_query_attention
from mmgpt.models.mmgpt import MMGPT
from mmgpt.pipeline import ImageEmbedding, Pipeline, _TextStream
from mmgpt.prompts import ASSISTANT, render_prompt


@pytest.fixture(params=["causal", "prefix"])
def engine(request, tiny_config, tokenizer):
    """A lively tiny model and its pipeline, in each attention mode."""
    tiny_config.decoder.attention = request.param
    torch.manual_seed(0)
    model = make_lively(MMGPT(tiny_config))
    return model, Pipeline(model, tokenizer)


# Prompts with no image, one, two and three images, of different lengths.
def mixed_requests(images):
    return (
        [[images[0], images[1]], None, images[2], [images[2], images[0], images[1]]],
        ["Compare the two images.", "What is one plus one?", "Describe the image.", "Hi"],
    )


def assert_lively(out: torch.Tensor) -> None:
    # The equalities below have teeth only if rows differ from each other and are not one repeated token.
    rows = out.tolist()
    assert len({tuple(r) for r in rows}) == len(rows)
    assert all(len(set(r)) > 3 for r in rows)


# ---------------------------------------------------------------------------------------------------------
# Batching


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


# ---------------------------------------------------------------------------------------------------------
# Sampling


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


def test_repetition_penalty_in_generation(lively, pipeline):
    ids, mask, _ = pipeline.encode([None], ["What is one plus one?"])
    free = generate(lively, ids, mask, max_new_tokens=20)[0].tolist()
    assert len(set(free)) < 20  # left alone the model repeats tokens
    penalized = generate(lively, ids, mask, max_new_tokens=20, repetition_penalty=1e6)[0].tolist()
    assert len(set(penalized)) == 20  # an overwhelming penalty never picks a seen token again
    assert not set(penalized) & set(ids[0].tolist())  # not the prompt's tokens either


def test_min_p_keeps_tokens_near_the_best():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    # min_p 0.5: keep tokens with p >= 0.25, i.e. tokens 0 and 1, in proportion 5:3.
    draws = sample(logits, do_sample=True, top_k=None, min_p=0.5, generator=g)
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean() - 0.625) < 0.03


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


# ---------------------------------------------------------------------------------------------------------
# Beam search


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


# ---------------------------------------------------------------------------------------------------------
# Stop strings and streaming


def scripted(tokenizer, text: str, tiny_config) -> Pipeline:
    """A pipeline whose model writes ``text`` and then eos, whatever the prompt.

    Every attention and MLP output is zero, so the logits depend on the last token alone; each token of the
    script has its own embedding direction, and the untied lm_head maps it to the next one.
    """
    script = [tokenizer.convert_tokens_to_ids(ASSISTANT), *tokenizer(text, add_special_tokens=False)["input_ids"],
              tokenizer.eos_token_id]
    assert len(set(script)) == len(script), "each token of the script needs a single successor"
    tiny_config.decoder.tie_embeddings = False
    model = MMGPT(tiny_config).eval()
    with torch.no_grad():
        for block in model.decoder.h:
            block.attn.proj.weight.zero_()
            block.mlp.proj.weight.zero_()
        model.decoder.wte.weight.zero_()
        model.decoder.lm_head.weight.zero_()
        for i, (token, successor) in enumerate(itertools.pairwise(script)):
            model.decoder.wte.weight[token, i] = 1.0
            model.decoder.lm_head.weight[successor, i] = 10.0
    return Pipeline(model, tokenizer)


@pytest.mark.parametrize("stop_strings,expected", [
    (None, "red circle. STOP blue"),
    (["STOP"], "red circle."),  # spread over four tokens
    (["irc"], "red c"),  # inside one token
    (["blue", ". "], "red circle"),  # the earliest of several wins
    (["green"], "red circle. STOP blue"),  # never appears
])
def test_stop_strings_cut_the_text(tokenizer, tiny_config, images, stop_strings, expected):
    pipe = scripted(tokenizer, "red circle. STOP blue", tiny_config)
    assert pipe.generate(images[0], "Describe the image.", stop_strings=stop_strings) == expected
    assert "".join(pipe.stream(images[0], "Describe the image.", stop_strings=stop_strings)) == expected


def test_stop_string_stops_the_row(tokenizer, tiny_config):
    pipe = scripted(tokenizer, "red circle. STOP blue", tiny_config)
    ids, mask, _ = pipe.encode([None, None], ["Hi", "A longer question here?"])
    out = generate(pipe.model, ids, mask, max_new_tokens=12, stop_strings=["STOP"], tokenizer=tokenizer,
                   pad_token_id=-1)
    script = tokenizer("red circle. STOP", add_special_tokens=False)["input_ids"]
    for row in out.tolist():  # both rows stop at the token that completes "STOP"; the rest is padding
        assert row == script + [-1] * (12 - len(script))


def test_stream_joins_to_generate(lively, pipeline, images):
    for kwargs in [{}, {"do_sample": True, "temperature": 1.5, "seed": 3}, {"repetition_penalty": 1.3}]:
        full = pipeline.generate(images[0], "Describe the image.", max_new_tokens=24, **kwargs)
        pieces = list(pipeline.stream(images[0], "Describe the image.", max_new_tokens=24, **kwargs))
        assert len(pieces) > 3 and "".join(pieces) == full
    # A stop string taken from the middle of the free text: the stream stops where generate cuts.
    full = pipeline.generate(images[0], "Describe the image.", max_new_tokens=24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = pipeline.generate(images[0], "Describe the image.", max_new_tokens=24, stop_strings=[stop])
    assert len(cut) < len(full) and stop not in cut
    assert "".join(pipeline.stream(images[0], "Describe the image.", max_new_tokens=24, stop_strings=[stop])) == cut


def test_stream_never_splits_a_multibyte_character(tokenizer, tiny_config):
    text = "Hé€😀 ok"
    pipe = scripted(tokenizer, text, tiny_config)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # byte-level tokens: é, € and 😀 each span several tokens
    assert "\ufffd" in tokenizer.decode(ids[:2])  # a cut inside a character decodes to U+FFFD
    pieces = list(pipe.stream(None, "Hi"))
    assert "".join(pieces) == pipe.generate(None, "Hi") == text
    assert len(pieces) >= 4 and not any("\ufffd" in p for p in pieces)


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(tokenizer):
    euro = tokenizer("€", add_special_tokens=False)["input_ids"]
    assert len(euro) == 3
    stream = _TextStream(tokenizer, stop_strings=["€!"])
    assert [stream.push(t) for t in tokenizer("a", add_special_tokens=False)["input_ids"] + euro] == ["a", "", "", ""]
    assert stream.push(tokenizer("b", add_special_tokens=False)["input_ids"][0]) == "€b"  # "€" then not "€!"
    assert stream.end() == ""


# ---------------------------------------------------------------------------------------------------------
# Image-embedding cache, finished rows, compile


def test_encode_image_once_for_many_questions(lively, pipeline, images):
    questions = ["Describe the image.", "What color is the circle?", "How many shapes are there?"]
    expected = pipeline.generate([images[0]] * 3, questions, max_new_tokens=8)
    calls = []
    hook = lively.vision.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        handle = pipeline.encode_image(images[0])
        assert isinstance(handle, ImageEmbedding) and calls == [1]
        assert pipeline.generate([handle] * 3, questions, max_new_tokens=8) == expected
        assert pipeline.generate(handle, questions[1], max_new_tokens=8) == expected[1]
        assert "".join(pipeline.stream(handle, questions[2], max_new_tokens=8)) == expected[2]
        # Handles and images mix, also several per prompt.
        mixed = pipeline.generate([[handle, images[1]], None], ["Compare the two images.", "Hi"], max_new_tokens=8)
        assert mixed == pipeline.generate([[images[0], images[1]], None], ["Compare the two images.", "Hi"],
                                          max_new_tokens=8)
        assert calls == [1, 1, 2]  # the handle was never encoded again (only images[1], and the reference)
    finally:
        hook.remove()
    other = ImageEmbedding(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="does not fit this model"):
        pipeline.generate(other, "Hi")


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


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])
def test_single_query_attention_equals_sdpa(n_query_groups):
    # The compiled decode step's written-out attention against SDPA, for MHA, GQA and MQA, both mask kinds.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 8, generator=g)
    k, v = torch.randn(2, 3, n_query_groups, 7, 8, generator=g)
    mask = torch.rand(3, 1, 1, 7, generator=g) > 0.3
    mask[..., -1] = True
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_query_groups != 4)
    for m in (mask, additive):
        torch.testing.assert_close(single_query_attention(q, k, v, m), expected, atol=1e-6, rtol=1e-5)
    unmasked = F.scaled_dot_product_attention(q, k, v, enable_gqa=n_query_groups != 4)
    torch.testing.assert_close(single_query_attention(q, k, v, None), unmasked, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(unmasked, expected)


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


# ---------------------------------------------------------------------------------------------------------
# Prefix-LM


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


def test_prefix_lm_training_logits_equal_generation_logits(tiny_config, tokenizer, images):
    tiny_config.decoder.attention = "prefix"
    model = make_lively(MMGPT(tiny_config))
    pipe = Pipeline(model, tokenizer)
    requests = [images[0], None, [images[1], images[2]]], ["Describe the image.", "What is one plus one?", "Hi"]
    ids, mask, pixels = pipe.encode(*requests)
    N = 8
    new = generate(model, ids, mask, pixels, max_new_tokens=N)
    assert_lively(new)
    # Training batches: right-padded prompt + answer rows, with the prefix at the start (as the Collator makes).
    lengths = mask.sum(1)
    T = int(lengths.max()) + N
    train_ids = torch.zeros(3, T, dtype=torch.long)
    for i in range(3):
        row = torch.cat([ids[i, mask[i].bool()], new[i]])
        train_ids[i, : row.numel()] = row
    with torch.no_grad():
        train_logits = model(train_ids, pixels, prefix_lengths=lengths)
        # The generation side's logits: the prefill's last position, then each cached step.
        state = _Batch(model, ids, mask, model.encode_images(pixels), N)
        steps = [state.logits]
        for s in range(N - 1):
            steps.append(state.step(new[:, s], s))
        state.close()
    for i in range(3):
        answer_positions = torch.arange(int(lengths[i]) - 1, int(lengths[i]) - 1 + N)
        torch.testing.assert_close(train_logits[i, answer_positions], torch.stack([s[i] for s in steps]),
                                   atol=1e-4, rtol=1e-4)
        assert torch.equal(train_logits[i, answer_positions].argmax(-1), new[i])
    # Causal training logits differ: the mode really changes the model.
    tiny_config.decoder.attention = "causal"
    with torch.no_grad():
        assert not torch.allclose(MMGPT.forward(model, train_ids, pixels), train_logits, atol=1e-3)


def test_collator_gives_prefix_lengths_and_prefix_model_requires_them(tiny_config, tokenizer, images):
    tiny_config.decoder.attention = "prefix"
    model = make_lively(MMGPT(tiny_config))
    collate = Collator(tokenizer, model.processor, model.image_seq_len, max_length=64)
    samples = [Sample(id="a", task="caption", image=images[0], prompt="Describe the image.", target="a red circle"),
               Sample(id="b", task="text", prompt="What is one plus one?", target="two")]
    batch = collate(samples)
    prompts = [render_prompt(s.prompt, int(s.image is not None), model.image_seq_len) for s in samples]
    prompt_lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert batch["prefix_lengths"].tolist() == prompt_lengths
    assert ((batch["labels"] != -100).long().argmax(1) == batch["prefix_lengths"]).all()  # answers start there
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["images"], prefix_lengths=batch["prefix_lengths"])
    assert logits.shape[:2] == batch["input_ids"].shape
    with pytest.raises(ValueError, match="needs prefix_lengths"):
        model(batch["input_ids"], batch["images"])
    with pytest.raises(ValueError, match=r"decoder.attention='bidirectional' is not one of"):
        DecoderConfig(vocab_size=8, attention="bidirectional")
    assert MMGPTConfig.from_dict(model.config.to_dict()).decoder.attention == "prefix"


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
