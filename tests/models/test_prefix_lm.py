"""Prefix-LM attention (``decoder.attention="prefix"``) through the model: the collator's prefix lengths, and
training logits equal to generation's."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_lively, make_lively

from mmgpt.config import DecoderConfig, MMGPTConfig
from mmgpt.data.collate import Collator
from mmgpt.data.sample import Sample
from mmgpt.generation.decode_state import DecodeState
from mmgpt.generation.engine import generate
from mmgpt.models.mmgpt import MMGPT
from mmgpt.pipeline import Pipeline
from mmgpt.prompts import render_prompt


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
        with DecodeState(model, ids, mask, N) as state:
            steps = [state.prefill(image_embeds=model.encode_images(pixels))]
            for s in range(N - 1):
                steps.append(state.step(new[:, s]))
    for i in range(3):
        answer_positions = torch.arange(int(lengths[i]) - 1, int(lengths[i]) - 1 + N)
        torch.testing.assert_close(train_logits[i, answer_positions], torch.stack([s[i] for s in steps]),
                                   atol=1e-4, rtol=1e-4)
        assert torch.equal(train_logits[i, answer_positions].argmax(-1), new[i])
    # Causal training logits differ: the mode really changes the model.
    tiny_config.decoder.attention = "causal"
    with torch.no_grad():
        assert not torch.allclose(MMGPT.forward(model, train_ids, pixels), train_logits, atol=1e-3)
