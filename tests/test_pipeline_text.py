"""The pipeline's text side: stop strings cut from the text, streaming that joins to generate, encoded images
reused across prompts."""

from __future__ import annotations

import pytest
import torch
from conftest import scripted

from mmgpt.pipeline import ImageEmbedding, TextStream


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
    stream = TextStream(tokenizer, stop_strings=["€!"])
    assert [stream.push(t) for t in tokenizer("a", add_special_tokens=False)["input_ids"] + euro] == ["a", "", "", ""]
    assert stream.push(tokenizer("b", add_special_tokens=False)["input_ids"][0]) == "€b"  # "€" then not "€!"
    assert stream.end() == ""


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
        # The handle was never encoded again (only images[1], then both for the reference), each picture alone.
        assert calls == [1, 1, 1, 1]
    finally:
        hook.remove()
    other = ImageEmbedding(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="does not fit this model"):
        pipeline.generate(other, "Hi")
