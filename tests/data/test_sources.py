"""Tests for the on-disk loaders and the mixture: correct samples, readable errors, seeded draws."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mmgpt.data import CocoCaptions, Mixture, Sample, ShapesDataset, TextFile, VQAJsonl
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
    with pytest.raises(FileNotFoundError, match=r"gone\.png \(sample coco/3/0\)"):
        ds[0]


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
