"""The collator: token layout, labels, padding side, truncation errors and image order."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmgpt.data.collate import IGNORE_INDEX, Collator
from mmgpt.data.sample import Sample
from mmgpt.models.image_processor import ImageProcessor
from mmgpt.prompts import render_prompt, render_target

SEQ = 4  # image_seq_len


def solid(rgb) -> Image.Image:
    return Image.new("RGB", (32, 32), rgb)


@pytest.fixture
def samples() -> list[Sample]:
    return [
        Sample("Describe the image.", "a large red circle at the top left.", solid((220, 30, 30)), "caption", "s/cap"),
        Sample("What is one plus one?", "two", None, "text", "s/text"),
        Sample("What color is it?", "blue", solid((30, 70, 220)), "vqa", "s/vqa", qtype="color"),
    ]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def collator(tokenizer, mode="train", max_length=96) -> Collator:
    return Collator(tokenizer, ImageProcessor(img_size=32), image_seq_len=SEQ, max_length=max_length, mode=mode)


def test_train_layout_labels_and_right_padding(tokenizer, samples):
    batch = collator(tokenizer)(samples)
    image_id, pad = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id
    lengths = []
    for i, s in enumerate(samples):
        prompt = encode(tokenizer, render_prompt(s.prompt, int(s.image is not None), SEQ))
        target = encode(tokenizer, render_target(s.target))
        assert target[-1] == tokenizer.eos_token_id
        n = len(prompt) + len(target)
        lengths.append(n)
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        assert ids[:n].tolist() == prompt + target
        assert (ids[n:] == pad).all()  # right padding
        assert mask.tolist() == [1] * n + [0] * (len(mask) - n)
        # Supervised exactly on target + eos; ignored on image, prompt and padding.
        assert labels[len(prompt) : n].tolist() == target
        assert (labels[: len(prompt)] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        assert (labels[ids == image_id] == IGNORE_INDEX).all()
        assert int((ids == image_id).sum()) == SEQ * int(s.image is not None)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, max(lengths))
    assert len(set(lengths)) == 3  # every row but the longest is padded
    assert batch["ids"] == ["s/cap", "s/text", "s/vqa"] and batch["tasks"] == ["caption", "text", "vqa"]


def test_generate_mode_left_pads_prompts(tokenizer, samples):
    batch = collator(tokenizer, mode="generate")(samples)
    assert "labels" not in batch
    T = batch["input_ids"].size(1)
    for i, s in enumerate(samples):
        prompt = encode(tokenizer, render_prompt(s.prompt, int(s.image is not None), SEQ))
        n = len(prompt)
        assert batch["input_ids"][i, T - n :].tolist() == prompt  # the prompt alone, ending at the last slot
        assert (batch["input_ids"][i, : T - n] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [0] * (T - n) + [1] * n
    assert batch["prompts"] == [s.prompt for s in samples]
    assert batch["answers"] == [[s.target] for s in samples]
    assert batch["qtypes"] == ["", "", "color"]


def test_truncation(tokenizer, samples):
    s = samples[0]
    prompt = encode(tokenizer, render_prompt(s.prompt, 1, SEQ))
    target = encode(tokenizer, render_target(s.target))
    # Room for one answer token: kept, and it is the only supervised label.
    batch = collator(tokenizer, max_length=len(prompt) + 1)([s])
    assert batch["input_ids"].shape == (1, len(prompt) + 1)
    assert (batch["labels"][0] != IGNORE_INDEX).nonzero().flatten().tolist() == [len(prompt)]
    assert int(batch["labels"][0, -1]) == target[0]
    # No room for any answer token: an error naming the sample, not a silent zero-loss row.
    with pytest.raises(ValueError, match=r"sample 's/cap'.*no room for an answer within max_length=\d+"):
        collator(tokenizer, max_length=len(prompt))([samples[1], s])
    # In generate mode the prompt may fill max_length exactly, but not exceed it.
    assert collator(tokenizer, mode="generate", max_length=len(prompt))([s])["input_ids"].shape == (1, len(prompt))
    with pytest.raises(ValueError, match="sample 's/cap'"):
        collator(tokenizer, mode="generate", max_length=len(prompt) - 1)([s])


def test_images_stacked_in_row_order(tokenizer, samples):
    proc = ImageProcessor(img_size=32)
    batch = collator(tokenizer)([samples[2], samples[1], samples[0]])  # blue, text, red
    assert batch["images"].shape == (2, 3, 32, 32)
    assert torch.equal(batch["images"], torch.stack([proc(samples[2].image), proc(samples[0].image)]))
    assert batch["images"][0, 2].mean() > batch["images"][0, 0].mean()  # first is the blue one


def test_text_only_batch_has_no_images(tokenizer, samples):
    for mode in ("train", "generate"):
        batch = collator(tokenizer, mode=mode)([samples[1], samples[1]])
        assert batch["images"] is None
        assert not (batch["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).any()
