"""Multi-turn conversations (LLaVA's JSON format): parsing, chat-template rendering, per-turn supervision."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmgpt.data.collate import IGNORE_INDEX, Collator
from mmgpt.data.sources import Conversations
from mmgpt.models.image_processor import ImageProcessor
from mmgpt.prompts import ASSISTANT, BOS, EOS, IMAGE, USER, encode_conversation

SEQ = 4  # image_seq_len

RECORDS = [
    {
        "id": "two-turns",
        "image": "red.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the circle?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Where is it?"},
            {"from": "gpt", "value": "at the top left"},
        ],
    },
    {"conversations": [{"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "one two three"}]},
    {
        "image": "red.png",
        "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "a dot"}],
    },
]


@pytest.fixture
def llava_json(tmp_path):
    Image.new("RGB", (32, 32), (220, 30, 30)).save(tmp_path / "red.png")
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(RECORDS))
    return path


def supervised_text(tokenizer, batch, row: int) -> list[str]:
    """The supervised tokens of a row, decoded run by run (one run per assistant turn)."""
    labels = batch["labels"][row].tolist()
    runs, current = [], []
    for t in [*labels, IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_llava_json_parses_into_conversations(llava_json):
    ds = Conversations(llava_json)
    assert len(ds) == 3
    s = ds[0]
    assert s.id == "two-turns" and s.image is not None and s.image.size == (32, 32)
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert (s.prompt, s.target) == ("What color is the circle?", "red")  # the first exchange, for evaluation
    assert ds[1].image is None and ds[1].id == "chat/1"
    # No <image> marker: the image goes before the first human turn, as LLaVA does.
    assert ds[2].messages[0]["content"] == IMAGE + "Describe it."


def test_only_assistant_turns_are_supervised(llava_json, tokenizer):
    ds = Conversations(llava_json)
    batch = Collator(tokenizer, ImageProcessor(img_size=32), SEQ, max_length=96)([ds[0], ds[1]])
    assert supervised_text(tokenizer, batch, 0) == ["red" + EOS, "at the top left" + EOS]
    assert supervised_text(tokenizer, batch, 1) == ["one two three" + EOS]
    ids = batch["input_ids"][0].tolist()
    text = tokenizer.decode(ids[: batch["attention_mask"][0].sum()])
    # mmgpt's own template: the image right after bos, then the turns.
    assert text == (
        BOS + IMAGE * SEQ + USER + "\nWhat color is the circle?" + ASSISTANT + "red" + EOS + USER + "Where is it?"
        + ASSISTANT + "at the top left" + EOS
    )
    assert batch["images"].shape == (1, 3, 32, 32)
    # The prefix (for prefix-LM attention) ends where the first answer starts.
    assert batch["prefix_lengths"][0] == ids.index(tokenizer.convert_tokens_to_ids(ASSISTANT)) + 1


def test_truncation_that_empties_a_turn_names_the_sample(llava_json, tokenizer):
    ds = Conversations(llava_json)
    ids, supervised, turns = encode_conversation(tokenizer, ds[0].conversation(), SEQ)
    second_start = turns[1][0]
    # Cut inside the second answer: it keeps a token, so this trains.
    batch = Collator(tokenizer, ImageProcessor(img_size=32), SEQ, max_length=second_start + 1)([ds[0]])
    assert len(supervised_text(tokenizer, batch, 0)) == 2
    # Cut before it: the turn would silently train on nothing. An error names the sample and the turn.
    with pytest.raises(ValueError, match=r"sample 'two-turns': assistant turn 2 of 2 .* loses all its supervised"):
        Collator(tokenizer, ImageProcessor(img_size=32), SEQ, max_length=second_start)([ds[0]])


@pytest.mark.parametrize(
    "record, message",
    [
        ({"conversations": "hi"}, r"\[0\]: missing list field 'conversations'"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\]: field 'from' must be one of"),
        ({"conversations": [{"from": "human", "value": ""}]}, r"conversations\[0\]: field 'value' must be"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "no 'gpt' turn"),
        ({"conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "x"}]}, "no 'image'"),
    ],
)
def test_malformed_records_name_file_and_index(tmp_path, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=message) as e:
        Conversations(path)
    assert str(path) in str(e.value)


def test_jsonl_and_the_datamodule_kind(tmp_path, llava_json):
    from mmgpt.data import DataSource, ShapesConfig

    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    ds = DataSource("conversations", path=str(path)).build("train", ShapesConfig())
    assert len(ds) == 3 and ds[0].messages == Conversations(llava_json)[0].messages
