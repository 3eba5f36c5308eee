"""Tests for the on-disk loaders and the mixture: correct samples, readable errors, seeded draws."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mmgpt.data import CocoCaptions, Conversations, Mixture, Sample, ShapesDataset, TextFile, VQAJsonl
from mmgpt.data.sources import TEXT_PROMPT
from mmgpt.prompts import CAPTION_PROMPT


def save_image(path, mode="RGB", color=(10, 20, 30)):
    Image.new(mode, (8, 6), color if mode == "RGB" else 128).save(path)


def test_coco_captions(tmp_path):
    (tmp_path / "img").mkdir()
    save_image(tmp_path / "img" / "a.png")
    save_image(tmp_path / "img" / "b.png", mode="L")  # grayscale must come back as RGB
    ann = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "annotations": [
            {"image_id": 1, "caption": "A cat  on a mat.\n"},
            {"image_id": 2, "caption": "A dog."},
            {"image_id": 1, "caption": "A small cat."},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    ds = CocoCaptions(tmp_path / "captions.json", tmp_path / "img")
    assert len(ds) == 3
    samples = [ds[i] for i in range(3)]
    cat = [s for s in samples if s.target == "A cat on a mat."]
    assert len(cat) == 1 and cat[0].answers == ["A cat on a mat.", "A small cat."]
    assert all(s.task == "caption" and s.prompt == CAPTION_PROMPT and s.image.mode == "RGB" for s in samples)
    assert {s.id for s in samples} == {"coco/1/0", "coco/1/1", "coco/2/0"}
    assert np.asarray(cat[0].image)[0, 0].tolist() == [10, 20, 30]


def test_coco_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(ValueError, match=r"bad\.json line 2.*malformed JSON"):
        CocoCaptions(bad, tmp_path)
    bad.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1}]})
    )
    with pytest.raises(ValueError, match=r"bad\.json annotations\[0\]: missing field 'caption'"):
        CocoCaptions(bad, tmp_path)
    bad.write_text(json.dumps({"images": [], "annotations": [{"image_id": 7, "caption": "x"}]}))
    with pytest.raises(ValueError, match="image_id 7 is not listed"):
        CocoCaptions(bad, tmp_path)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"bad\.json: expected a JSON object with 'images'"):
        CocoCaptions(bad, tmp_path)
    # A missing image is reported lazily, with its path and its sample.
    bad.write_text(
        json.dumps(
            {"images": [{"id": 3, "file_name": "gone.png"}], "annotations": [{"image_id": 3, "caption": "x"}]}
        )
    )
    ds = CocoCaptions(bad, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"gone\.png \(sample coco/3/0, .*bad\.json image id 3\)"):
        ds[0]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            {"images": [{"id": [1], "file_name": "a.png"}], "annotations": []},
            r"bad\.json images\[0\]: field 'id' must be an integer or a string, got \[1\]",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": {"a": 1}, "caption": "x"}]},
            r"bad\.json annotations\[0\]: field 'image_id' must be an integer or a string, got \{'a': 1\}",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": [7], "image_id": 1, "caption": "x"}]},
            r"bad\.json annotations\[0\]: field 'id' must be an integer or a string, got \[7\]",
        ),
    ],
)
def test_coco_unhashable_ids_are_refused_by_place(tmp_path, data, match):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        CocoCaptions(bad, tmp_path)


def test_coco_string_ids_still_work(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "images": [{"id": "im1", "file_name": "a.png"}],
        "annotations": [{"id": "c1", "image_id": "im1", "caption": "x"}],
    }))
    assert CocoCaptions(path, tmp_path)[0].id == "coco/im1/0"


def test_collator_names_the_sample_with_a_bad_prompt(tokenizer):
    # A Sample built by hand (not read from a file) with "<image>" in its prompt: the collator's error names it.
    from mmgpt.data.collate import Collator
    from mmgpt.models.image_processor import ImageProcessor

    good = Sample("What is it?", "a box", Image.new("RGB", (8, 8)), "vqa", "ok/1")
    bad = Sample("What is <image> here?", "a box", Image.new("RGB", (8, 8)), "vqa", "bad/7")
    for mode in ("train", "generate"):
        collate = Collator(tokenizer, ImageProcessor(img_size=8), image_seq_len=2, max_length=64, mode=mode)
        collate([good])
        with pytest.raises(ValueError, match=r"^sample 'bad/7': .*<image>") as info:
            collate([good, bad])
        assert type(info.value) is ValueError and info.value.__cause__ is not None
    broken = Sample("Why?", "\udfff", None, "text", "bad/8")
    with pytest.raises(ValueError, match=r"^sample 'bad/8': .*not valid Unicode"):
        Collator(tokenizer, ImageProcessor(img_size=8), image_seq_len=2)([broken])
    not_text = Sample(3, "x", None, "text", "bad/9")
    with pytest.raises(TypeError, match=r"^sample 'bad/9': "):
        Collator(tokenizer, ImageProcessor(img_size=8), image_seq_len=2)([not_text])


def test_vqa_jsonl(tmp_path):
    (tmp_path / "images").mkdir()
    save_image(tmp_path / "images" / "x.png", mode="RGBA")
    lines = [
        {"image": "images/x.png", "question": "What is it?", "answer": "a box"},
        {
            "image": "images/x.png",
            "question": "How many?",
            "answers": ["2", "two", "2", "3"],
            "question_type": "count",
            "id": "q42",
        },
    ]
    path = tmp_path / "vqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    ds = VQAJsonl(path)  # image paths relative to the file's folder
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert (a.prompt, a.target, a.answers, a.task, a.id) == (
        "What is it?",
        "a box",
        ["a box"],
        "vqa",
        "vqa/1",
    )
    assert b.target == "2" and b.answers == ["2", "two", "2", "3"] and b.qtype == "count" and b.id == "q42"
    assert a.image.mode == "RGB"
    # An explicit image root.
    path2 = tmp_path / "other.jsonl"
    path2.write_text(json.dumps({"image": "x.png", "question": "q?", "answer": "y"}))
    assert VQAJsonl(path2, image_root=tmp_path / "images")[0].image.size == (8, 6)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (
            '{"image": "x.png", "answer": "y"}',
            r"vqa\.jsonl line 2: missing field 'question' \(expected 'image', "
            r"'question' and 'answer' or 'answers'\)",
        ),
        ('{"image": "x.png", "question": "q"}', r"vqa\.jsonl line 2: missing field 'answer' or 'answers'"),
        (
            '{"image": "x.png", "question": "q", "answers": []}',
            r"line 2: field 'answers' must be a non-empty",
        ),
        (
            json.dumps({"image": "x.png", "question": "q", "answers": ["y", "\ud800"]}),
            r"vqa\.jsonl line 2: field 'answers\[1\]' is not valid Unicode text",
        ),
        (
            json.dumps({"image": "x.png", "question": "q", "answers": ["", " "]}),
            r"vqa\.jsonl line 2: field 'answers\[0\]' must be a non-empty string, got ''",
        ),
        (
            json.dumps({"image": "x.png", "question": "q", "answers": ["y", " \n"]}),
            r"vqa\.jsonl line 2: field 'answers\[1\]' must be a non-empty string",
        ),
        (
            json.dumps({"image": "x.png", "question": "q", "answers": ["y", 3]}),
            r"vqa\.jsonl line 2: field 'answers\[1\]' must be a non-empty string, got 3",
        ),
        (
            json.dumps({"image": "x.png", "question": "q", "answers": "y"}),
            r"line 2: field 'answers' must be a non-empty list of strings",
        ),
        (
            '{"image": "x.png", "question": "q", "answer": 3}',
            r"line 2: field 'answer' must be a non-empty string",
        ),
        ('{"image": "x.png", "question": "q", "answer": "y"', r"vqa\.jsonl line 2: malformed JSON"),
        ('["x.png", "q", "y"]', r"vqa\.jsonl line 2: expected a JSON object"),
    ],
)
def test_vqa_errors_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "vqa.jsonl"
    path.write_text('{"image": "x.png", "question": "q", "answer": "y"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        VQAJsonl(path)


def test_vqa_missing_image_and_file(tmp_path):
    path = tmp_path / "vqa.jsonl"
    path.write_text('{"image": "nope.png", "question": "q", "answer": "y"}\n')
    with pytest.raises(FileNotFoundError, match=r"nope\.png \(sample vqa/1, .*vqa\.jsonl line 1\)"):
        VQAJsonl(path)[0]
    (tmp_path / "broken.png").write_text("not an image")
    path.write_text('{"image": "broken.png", "question": "q", "answer": "y"}\n')
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        VQAJsonl(path)[0]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        VQAJsonl(tmp_path / "missing.jsonl")


def test_text_file(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first line\n\n  second line  \nthird\n\n")
    ds = TextFile(txt)
    assert [(s.prompt, s.target, s.id) for s in ds] == [
        (TEXT_PROMPT, "first line", "notes/1"),
        (TEXT_PROMPT, "second line", "notes/3"),
        (TEXT_PROMPT, "third", "notes/4"),
    ]
    assert all(s.image is None and s.task == "text" for s in ds)
    paragraphs = TextFile(txt, unit="paragraph")
    assert [(s.target, s.id) for s in paragraphs] == [
        ("first line", "notes/1"),
        ("second line third", "notes/3"),
    ]

    jl = tmp_path / "chat.jsonl"
    jl.write_text('{"prompt": "Say hi.", "completion": "hi"}\n{"text": "Once upon a time."}\n')
    assert [(s.prompt, s.target) for s in TextFile(jl)] == [
        ("Say hi.", "hi"),
        (TEXT_PROMPT, "Once upon a time."),
    ]
    jl.write_text('{"prompt": "Say hi.", "completion": "hi"}\n{"prompt": "Say bye."}\n')
    with pytest.raises(ValueError, match=r"chat\.jsonl line 2: missing field 'completion'"):
        TextFile(jl)
    jl.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"chat\.jsonl line 1: no field 'text' or 'prompt'"):
        TextFile(jl)
    with pytest.raises(ValueError, match=r"data\.csv.*expected \.txt or \.jsonl"):
        TextFile(tmp_path / "data.csv")


# ---------------------------------------------------------------------------------------------------------
# Bad data files: each error names the file and the line (or the id) where it went wrong

VQA_LINE = '{"image": "x.png", "question": "q", "answer": "y"}'
CHAT_RECORD = '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "%s"}]}'
COCO_IMAGES = '{"images": [{"id": 1, "file_name": "a.png"}],\n'


def coco(annotations: str) -> str:
    return COCO_IMAGES + ' "annotations": [\n' + annotations + "\n]}"


# (name, file name, bytes, loader, regex the error must match). Latin-1 "é" (0xe9) is the usual non-UTF-8 byte.
BAD_FILES = [
    (
        "vqa_jsonl_latin1",
        "q.jsonl",
        f"{VQA_LINE}\n{VQA_LINE}\n".encode() + b'{"image": "x.png", "question": "caf\xe9?", "answer": "y"}\n',
        VQAJsonl,
        r"q\.jsonl line 3 column 36: not UTF-8 \(byte 0xe9\)",
    ),
    (
        "coco_json_latin1",
        "captions.json",
        coco('{"image_id": 1, "caption": "ok"},\n{"image_id": 1, "caption": "caf\xe9"}').encode("latin-1"),
        lambda path: CocoCaptions(path, path.parent),
        r"captions\.json line 4 column 32: not UTF-8 \(byte 0xe9\)",
    ),
    (
        "conversations_json_latin1",
        "chat.json",
        ("[\n" + CHAT_RECORD % "ok" + ",\n" + CHAT_RECORD % "s\xfcr" + "\n]").encode("latin-1"),
        Conversations,
        r"chat\.json line 3 column \d+: not UTF-8 \(byte 0xfc\)",
    ),
    (
        "conversations_jsonl_latin1",
        "chat.jsonl",
        (CHAT_RECORD % "ok" + "\n" + CHAT_RECORD % "s\xfcr").encode("latin-1"),
        Conversations,
        r"chat\.jsonl line 2 column \d+: not UTF-8",
    ),
    ("text_txt_latin1", "notes.txt", "first\ncaf\xe9\n".encode("latin-1"), TextFile, r"notes\.txt line 2 column 4"),
    (
        "text_jsonl_truncated_utf8",  # a multi-byte character cut in half, as a file split at a byte offset leaves
        "t.jsonl",
        '{"text": "ok"}\n{"text": "€"}'.encode()[:-3],
        TextFile,
        r"t\.jsonl line 2 column 11: not UTF-8 \(byte 0xe2\)",
    ),
    (
        "coco_duplicate_image_id",
        "captions.json",
        b'{"images": [{"id": 5, "file_name": "a.png"}, {"id": 6, "file_name": "b.png"}, '
        b'{"id": 5, "file_name": "c.png"}], "annotations": []}',
        lambda path: CocoCaptions(path, path.parent),
        r"captions\.json images\[2\]: duplicate image id 5 \(also images\[0\]\); each image must be listed once",
    ),
    (
        "coco_duplicate_annotation_id",
        "captions.json",
        coco('{"id": 9, "image_id": 1, "caption": "a"},\n{"id": 9, "image_id": 1, "caption": "b"}').encode(),
        lambda path: CocoCaptions(path, path.parent),
        r"captions\.json annotations\[1\]: duplicate annotation id 9 \(also annotations\[0\]\)",
    ),
    (
        "coco_string_image_ids_duplicate",  # ids need not be integers; a repeat is a repeat
        "captions.json",
        b'{"images": [{"id": "x", "file_name": "a.png"}, {"id": "x", "file_name": "a.png"}], "annotations": []}',
        lambda path: CocoCaptions(path, path.parent),
        r"images\[1\]: duplicate image id 'x' \(also images\[0\]\)",
    ),
]


@pytest.mark.parametrize("name, data, load, match", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_data_files_name_file_and_line(tmp_path, name, data, load, match):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        load(path)


def test_utf8_byte_order_mark_and_crlf_line_ends_are_read(tmp_path):
    # Windows editors start UTF-8 files with a byte-order mark and end lines with \r\n: the same records.
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{VQA_LINE}\r\n\r\n{VQA_LINE}\r\n".encode())
    ds = VQAJsonl(path)
    assert [r["id"] for r in ds.records] == ["q/1", "q/3"] and ds.records[0]["question"] == "q"
    path = tmp_path / "captions.json"
    path.write_bytes(b"\xef\xbb\xbf" + coco('{"id": 1, "image_id": 1, "caption": "a"}').encode())
    assert CocoCaptions(path, tmp_path).captions == {1: ["a"]}


# ---------------------------------------------------------------------------------------------------------
# Mixture


class Numbers:
    """A tiny map-style dataset: item j of source `name` is (name, j)."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> tuple[str, int]:
        if not 0 <= j < self.n:
            raise IndexError(j)
        return self.name, j


def test_mixture_follows_weights_and_is_deterministic():
    sources = [Numbers("a", 1000), Numbers("b", 50), Numbers("c", 10)]
    mix = Mixture(sources, weights=[6, 3, 1], length=5000, seed=3)
    items = [mix[i] for i in range(len(mix))]
    share = Counter(name for name, _ in items)
    for name, w in zip("abc", (0.6, 0.3, 0.1), strict=True):
        assert abs(share[name] / len(mix) - w) < 0.03
    same, other = Mixture(sources, [6, 3, 1], 5000, seed=3), Mixture(sources, [6, 3, 1], 5000, seed=4)
    assert items == [same[i] for i in range(5000)]
    assert items != [other[i] for i in range(5000)]
    # Each source hands out whole passes: no item repeats before every item of its source was used.
    a_items = [j for name, j in items if name == "a"]
    assert len(set(a_items)) == min(len(a_items), 1000)
    b_items = [j for name, j in items if name == "b"]
    assert sorted(b_items[:50]) == list(range(50))
    # A zero weight drops a source.
    assert {name for name, _ in Mixture(sources, [1, 0, 1], 200, seed=0)} == {"a", "c"}


def test_mixture_of_samples():
    shapes = ShapesDataset("train", 5)
    mix = Mixture([shapes, Numbers("n", 3)], weights=[1.0, 0.0], length=10, seed=0)
    assert all(isinstance(mix[i], Sample) for i in range(10))


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], "one weight per dataset"),
        ([1.0, -1.0], "non-negative"),
        ([0.0, 0.0], "not all zero"),
        ([1.0, float("nan")], "finite"),
    ],
)
def test_mixture_validation(weights, match):
    with pytest.raises(ValueError, match=match):
        Mixture([Numbers("a", 3), Numbers("b", 3)], weights, length=10, seed=0)


def test_mixture_rejects_empty_source():
    with pytest.raises(ValueError, match="dataset 1 .* is empty"):
        Mixture([Numbers("a", 3), Numbers("b", 0)], [1, 1], length=10, seed=0)


# Text fields that become user turns, checked when the file is read (so the error names file and line), not when a
# batch is collated.
@pytest.mark.parametrize("record,match", [
    ({"image": "a.png", "question": "What is <image> here?", "answer": "x"}, r"q\.jsonl line 1: field 'question' "
     r"holds <image>"),
    ({"image": "a.png", "question": "What is \ud800?", "answer": "x"}, r"q\.jsonl line 1: field 'question' is not "
     r"valid Unicode text"),
    ({"image": "a.png", "question": "Why?", "answer": "\udfff"}, r"q\.jsonl line 1: field 'answer' is not valid"),
])
def test_vqa_text_fields_are_checked_where_they_are_read(tmp_path, record, match):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=match):
        VQAJsonl(path, image_root=tmp_path)


def test_image_marker_counts_only_in_human_turns(tmp_path):
    # "<image>" in an answer is text, as the prompt encoder treats it; the image still goes to the human turn.
    record = {"id": "r", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat does the sign say?"},
        {"from": "gpt", "value": "It says <image>."},
    ]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps([record]))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    sample = Conversations(path, image_root=tmp_path)[0]
    assert sample.messages[1]["content"] == "It says <image>."
    bad = {**record, "conversations": [{"from": "human", "value": "What is \ud800?"}, record["conversations"][1]]}
    path.write_text(json.dumps([bad]))
    with pytest.raises(ValueError, match=r"c\.json \[0\] conversations\[0\]: field 'value' is not valid Unicode"):
        Conversations(path, image_root=tmp_path)
