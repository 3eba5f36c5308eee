"""A chat's next turn reuses the KV cache of the earlier turns (``PrefixCache``): every turn gives exactly the greedy
tokens of a full prefill, only the new tokens are prefilled, and anything that would change the cached keys (an
edited message, another image, other weights, a prefix-LM) falls back to a full prefill."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from conftest import TINY_PROJECTOR, TINY_VISION, make_lively

from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.generation.engine import generate
from mmgpt.generation.prefix_cache import PrefixCache
from mmgpt.generation.quantize import quantize_decoder_
from mmgpt.models.mmgpt import MMGPT
from mmgpt.pipeline import Pipeline
from mmgpt.prompts import IMAGE

QUESTIONS = ["Describe the image.", "What color is the circle?", "And how many shapes are there?"]
MAX_NEW = 8


def user(text: str, *images) -> dict:
    return {"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                        {"type": "text", "text": text}]}


class Prefills:
    """Records the tokens each prefill ran the decoder over (decode steps pass ids, prefills embeddings)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.lengths: list[int] = []
        self.handle = pipeline.model.decoder.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        if kwargs.get("inputs_embeds") is not None:
            self.lengths.append(kwargs["inputs_embeds"].size(1))

    def pop(self) -> list[int]:
        lengths, self.lengths = self.lengths, []
        return lengths


def prompt_length(pipeline: Pipeline, messages) -> int:
    return pipeline.encode_chat([messages])[0].size(1)


def hf_pipeline(tokenizer, kind: str) -> Pipeline:
    """A tiny random HF decoder (``backend: hf``) behind mmgpt's tokenizer and chat template."""
    common = dict(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4)
    hf_config = {
        "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                      max_position_embeddings=128, **common),
        "gpt2": dict(model_type="gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128),
    }[kind]
    config = MMGPTConfig(
        vision=VisionConfig(**TINY_VISION), projector=ProjectorConfig(**TINY_PROJECTOR),
        decoder=DecoderConfig(vocab_size=len(tokenizer), block_size=128, hf_config=hf_config, backend="hf"),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    torch.manual_seed(0)
    return Pipeline(make_lively(MMGPT(config)), tokenizer)


@pytest.fixture(params=["native", "hf-llama", "hf-gpt2"])
def chat_pipeline(request, lively, pipeline, tokenizer) -> Pipeline:
    if request.param == "native":
        return pipeline
    return hf_pipeline(tokenizer, request.param.removeprefix("hf-"))


def three_turns(pipeline: Pipeline, image, prefills: Prefills | None = None, **kwargs) -> list[str]:
    """Chat three turns about ``image``; at each, the reply must equal a full prefill's and (given ``prefills``)
    only what follows the previous turn's prompt may have been prefilled."""
    pipeline.prefix_cache.clear()
    messages, replies, previous = [user(QUESTIONS[0], image)], [], 0
    for turn, question in enumerate(QUESTIONS):
        if turn:
            messages += [{"role": "assistant", "content": replies[-1]}, user(question)]
        reply = pipeline.chat(messages, max_new_tokens=MAX_NEW, **kwargs)
        full = pipeline.chat(messages, max_new_tokens=MAX_NEW, reuse_cache=False, **kwargs)
        assert reply == full, f"turn {turn}"
        T = prompt_length(pipeline, messages)
        if prefills is not None:
            reused, alone = prefills.pop()
            assert alone == T  # reuse_cache=False: the whole prompt
            # Turn 0 has nothing to reuse; later turns reuse at least the previous prompt and its fed reply.
            assert reused == T if turn == 0 else reused <= T - previous, (turn, reused, T, previous)
        previous = T
        replies.append(reply)
    assert len(set(replies)) > 1 and all(len(r) > 3 for r in replies)  # lively answers: a mix-up would show
    return replies


def test_three_turns_reuse_the_cache_and_equal_full_prefills(chat_pipeline, images):
    prefills = Prefills(chat_pipeline)
    three_turns(chat_pipeline, images[0], prefills)
    assert len(chat_pipeline.prefix_cache) == 1  # each turn's entry replaced the one it continued


def test_reused_prefix_gives_the_same_token_ids(lively, pipeline, images):
    # Below the text: the engine's token ids with a prefix cache equal those of a full prefill, turn by turn.
    cache = PrefixCache()
    messages = [user(QUESTIONS[0], images[0])]
    for question in QUESTIONS[1:]:
        ids, mask, embeds = pipeline.encode_chat([messages])
        kw = dict(image_embeds=embeds, max_new_tokens=MAX_NEW, eos_token_id=None)
        reused = generate(lively, ids, mask, prefix_cache=cache, **kw)
        assert torch.equal(reused, generate(lively, ids, mask, **kw))
        reply = pipeline.tokenizer.decode(reused[0], skip_special_tokens=True)
        messages += [{"role": "assistant", "content": reply}, user(question)]
    (entry,) = cache._entries.values()
    assert entry.ids.numel() == ids.size(1) + MAX_NEW - 1  # the prompt and every fed token (not the last one)


def test_an_edited_earlier_message_reuses_only_what_comes_before_it(lively, pipeline, images):
    prefills = Prefills(pipeline)
    messages = [user(QUESTIONS[0], images[0])]
    reply = pipeline.chat(messages, max_new_tokens=MAX_NEW)
    messages += [{"role": "assistant", "content": reply}, user(QUESTIONS[1])]
    pipeline.chat(messages, max_new_tokens=MAX_NEW)
    prefills.pop()
    edited = [user("Describe the picture.", images[0]), *messages[1:]]
    ids = pipeline.encode_chat([edited])[0][0]
    before = pipeline.encode_chat([messages])[0][0]
    common = int((ids[: before.numel()] != before[: ids.numel()]).nonzero()[0])
    assert pipeline.chat(edited, max_new_tokens=MAX_NEW) == pipeline.chat(
        edited, max_new_tokens=MAX_NEW, reuse_cache=False
    )
    assert prefills.pop()[0] == ids.numel() - common  # everything from the edit on


def test_another_image_ends_the_reused_prefix(lively, pipeline, images):
    prefills = Prefills(pipeline)
    messages = [user(QUESTIONS[0], images[0])]
    reply = pipeline.chat(messages, max_new_tokens=MAX_NEW)
    followed = [*messages, {"role": "assistant", "content": reply}]
    L = lively.image_seq_len
    cases = {
        # mmgpt's template puts every image first: a new image in a later turn keeps bos and the first image only.
        "new image in a later turn": ([*followed, user(QUESTIONS[1], images[1])], 1 + L),
        # The same tokens with another picture in the first image's slots: only bos is the same.
        "another first image": ([user(QUESTIONS[0], images[2]), *followed[1:], user(QUESTIONS[1])], 1),
        # The same picture again, as a new tensor: equal by value, so everything before the new turn is reused.
        "the same image again": ([user(QUESTIONS[0], images[0].clone()), *followed[1:], user(QUESTIONS[1])], None),
    }
    for name, (conversation, kept) in cases.items():
        prefills.pop()
        full = pipeline.chat(conversation, max_new_tokens=MAX_NEW, reuse_cache=False)
        assert pipeline.chat(conversation, max_new_tokens=MAX_NEW) == full, name
        T = prompt_length(pipeline, conversation)
        prefilled = prefills.pop()[1]
        if kept is None:
            assert prefilled <= T - prompt_length(pipeline, messages), name
        else:
            assert prefilled == T - kept, name
        pipeline.chat(messages, max_new_tokens=MAX_NEW)  # the first turn's entry again, for the next case


def test_threads_chatting_different_conversations_get_their_serial_answers(lively, pipeline, images):
    questions = [QUESTIONS, ["Hi", "Count from one to five.", "Again, slower."]]

    def converse(pipe: Pipeline, t: int, log: list, events: list[threading.Event] | None = None) -> None:
        messages = []
        for i, question in enumerate(questions[t]):
            if events is not None:
                events[2 * i + t].wait(timeout=60)  # the threads alternate: turn i of thread 0, then of thread 1
            messages.append(user(question, images[t]) if i == 0 else user(question))
            log.append((prompt_length(pipe, messages), pipe.chat(messages, max_new_tokens=MAX_NEW)))
            messages.append({"role": "assistant", "content": log[-1][1]})
            if events is not None:
                events[2 * i + t + 1].set()

    serial = []
    for t in range(2):
        serial.append([])
        converse(copy.deepcopy(pipeline), t, serial[-1])  # a copy: a model and an empty cache of its own
    assert serial[0] != serial[1]
    full = [T for turn in zip(*serial, strict=True) for T, _ in turn]  # prompt lengths, in the alternating order
    for max_entries in (4, 1):
        pipeline.prefix_cache = PrefixCache(max_entries)
        prefills = Prefills(pipeline)
        events, logs = [threading.Event() for _ in range(7)], [[], []]
        threads = [threading.Thread(target=converse, args=(pipeline, t, logs[t], events)) for t in range(2)]
        for thread in threads:
            thread.start()
        events[0].set()
        for thread in threads:
            thread.join(timeout=120)
        prefills.handle.remove()
        assert logs == serial, max_entries
        lengths = prefills.pop()
        # The first turns have nothing to reuse but bos (the other image ends the common prefix right after it).
        assert lengths[:2] == [full[0], full[1] - 1]
        if max_entries == 4:  # each conversation keeps its entry: later turns prefill their new tokens only
            assert all(n <= T - before for n, T, before in zip(lengths[2:], full[2:], full[:-2], strict=True)), lengths
        else:  # the conversations evict each other: only bos is common to them
            assert lengths[2:] == [T - 1 for T in full[2:]]


def test_no_reuse_where_the_cached_keys_would_differ(engine, images):
    # A prefix-LM's prompt tokens see the whole prompt, so a longer prompt changes their keys; beams, batches of
    # several conversations and the uncached reference have more than one row or no cache. Each prefills in full
    # and answers as before.
    model, pipe = engine
    prefills = Prefills(pipe)
    messages = [user(QUESTIONS[0], images[0])]
    reply = pipe.chat(messages, max_new_tokens=MAX_NEW)
    first = prompt_length(pipe, messages)
    messages += [{"role": "assistant", "content": reply}, user(QUESTIONS[1])]
    T = prompt_length(pipe, messages)
    prefills.pop()
    prefix_lm = model.config.decoder.attention == "prefix"
    assert pipe.chat(messages, max_new_tokens=MAX_NEW) == pipe.chat(messages, max_new_tokens=MAX_NEW, reuse_cache=False)
    reused, alone = prefills.pop()
    assert alone == T and (reused == T if prefix_lm else reused <= T - first)
    if prefix_lm:
        assert len(pipe.prefix_cache) == 0
        return
    for kwargs in [dict(num_beams=2), dict(use_cache=False)]:
        assert pipe.chat(messages, max_new_tokens=MAX_NEW, **kwargs) == pipe.chat(
            messages, max_new_tokens=MAX_NEW, reuse_cache=False, **kwargs
        )
        assert prefills.pop()[0] == T, kwargs
    assert pipe.chat([messages, [user("Hi")]], max_new_tokens=MAX_NEW)[0] == pipe.chat(
        messages, max_new_tokens=MAX_NEW, reuse_cache=False
    )
    assert prefills.pop()[0] == T


def test_sampling_several_sequences_reuses_and_keeps_the_prompt(lively, pipeline, images):
    messages = [user(QUESTIONS[0], images[0])]
    pipeline.chat(messages, max_new_tokens=MAX_NEW)
    messages += [{"role": "assistant", "content": "red"}, user(QUESTIONS[1])]
    kw = dict(max_new_tokens=MAX_NEW, do_sample=True, num_return_sequences=3, seed=7)
    prefills = Prefills(pipeline)
    samples = pipeline.chat(messages, **kw)
    assert samples == pipeline.chat(messages, reuse_cache=False, **kw) and len(set(samples)) == 3
    T = prompt_length(pipeline, messages)
    assert prefills.pop()[0] < T
    # Three continuations share only the prompt: that is what is kept.
    assert max(e.ids.numel() for e in pipeline.prefix_cache._entries.values()) == T


def test_chat_stream_reuses_and_an_early_close_keeps_what_was_written(lively, pipeline, images):
    prefills = Prefills(pipeline)
    messages = [user(QUESTIONS[0], images[0])]
    stream = pipeline.chat_stream(messages, max_new_tokens=MAX_NEW)
    first = next(stream)
    stream.close()
    T = prompt_length(pipeline, messages)
    (entry,) = pipeline.prefix_cache._entries.values()
    assert T <= entry.ids.numel() <= T + MAX_NEW - 1
    reply = "".join(pipeline.chat_stream(messages, max_new_tokens=MAX_NEW))
    assert reply.startswith(first) and reply == pipeline.chat(messages, max_new_tokens=MAX_NEW, reuse_cache=False)
    messages += [{"role": "assistant", "content": reply}, user(QUESTIONS[1])]
    prefills.pop()
    assert "".join(pipeline.chat_stream(messages, max_new_tokens=MAX_NEW)) == pipeline.chat(
        messages, max_new_tokens=MAX_NEW, reuse_cache=False
    )
    assert prefills.pop()[0] <= prompt_length(pipeline, messages) - T


def test_changed_weights_drop_the_cached_prefixes(lively, pipeline, images):
    prefills = Prefills(pipeline)
    messages = [user(QUESTIONS[0], images[0])]
    pipeline.chat(messages, max_new_tokens=MAX_NEW)
    T = prompt_length(pipeline, messages)
    with torch.no_grad():
        lively.decoder.h[0].mlp.fc.weight.mul_(1.5)  # in place: same tensor, new version
    prefills.pop()
    assert pipeline.chat(messages, max_new_tokens=MAX_NEW) == pipeline.chat(
        messages, max_new_tokens=MAX_NEW, reuse_cache=False
    )
    assert prefills.pop()[0] == T
    lively.train()
    lively.eval()  # back in eval mode: the key is the same again
    pipeline.chat(messages, max_new_tokens=MAX_NEW)
    assert prefills.pop() == [1]


def test_int8_decoder_reuses_and_equals_full_prefills(lively, pipeline, images):
    # A short suffix goes through the int8 matrix-vector kernel, a full prefill de-quantizes: the same tokens.
    quantize_decoder_(lively.decoder)
    three_turns(pipeline, images[0], Prefills(pipeline))


def test_compiled_decode_step_reuses_and_equals_full_prefills(lively, pipeline, images):
    three_turns(pipeline, images[1], Prefills(pipeline), compile=True)


@pytest.mark.gpu
def test_reuse_on_cuda(lively, pipeline, images):
    pipeline.to("cuda")
    three_turns(pipeline, images[0], Prefills(pipeline))
    (entry,) = pipeline.prefix_cache._entries.values()
    assert entry.kv[0][0].is_cuda and not entry.ids.is_cuda
    pipeline.to("cpu")  # moved storage: the CUDA entry is not used on the CPU
    prefills = Prefills(pipeline)
    messages = [user(QUESTIONS[0], images[0])]
    pipeline.chat(messages, max_new_tokens=MAX_NEW)
    assert prefills.pop() == [prompt_length(pipeline, messages)]


def test_hf_sliding_window_layers_fall_back_to_a_full_prefill(tokenizer, images):
    pipe = hf_pipeline(tokenizer, "llama")
    pipe.model.decoder.model.config.layer_types = ["sliding_attention", "full_attention"]
    pipe.model.decoder.model.config.sliding_window = 64
    prefills = Prefills(pipe)
    messages = [user(QUESTIONS[0], images[0])]
    pipe.chat(messages, max_new_tokens=MAX_NEW)
    assert len(pipe.prefix_cache) == 0  # a sliding-window layer's cache is not copied
    pipe.chat(messages, max_new_tokens=MAX_NEW)
    T = prompt_length(pipe, messages)
    assert prefills.pop() == [T, T]


def test_the_cache_is_bounded_and_not_copied(lively, pipeline, images):
    pipeline.prefix_cache = PrefixCache(max_entries=2)
    for prompt in ["Hi", "Count.", "Describe the image."]:
        pipeline.chat([user(prompt, images[0])], max_new_tokens=MAX_NEW)
    cache = pipeline.prefix_cache
    assert len(cache) == 2 and 0 < cache.nbytes
    c = lively.config.decoder
    per_entry = 2 * c.n_layer * c.n_query_groups * c.block_size * c.head_size * 4  # float32, a full-length row
    assert cache.nbytes <= 2 * (per_entry + lively.image_seq_len * c.n_embd * 4)
    twin = copy.deepcopy(pipeline)
    assert len(twin.prefix_cache) == 0 and twin.prefix_cache.max_entries == 2
    assert len(pickle.loads(pickle.dumps(cache))) == 0
    pipeline.prefix_cache = None  # off
    assert pipeline.chat([user("Hi", images[0])], max_new_tokens=MAX_NEW)
    with pytest.raises(ValueError, match="max_entries must be an int >= 1"):
        PrefixCache(0)
    with pytest.raises(TypeError, match="reuse_cache must be True or False"):
        pipeline.chat([user("Hi")], reuse_cache="no")
