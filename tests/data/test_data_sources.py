"""Tests for the shapes dataset and the on-disk loaders: determinism, correct answers, readable errors."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mmgpt.data.datamodule import DataSource
from mmgpt.data.sample import Sample
from mmgpt.data.shapes import (
    NUMBER_WORDS,
    POSITIONS,
    QTYPES,
    Scene,
    ShapesConfig,
    ShapesDataset,
    caption,
    random_scene,
    render_scene,
    shapes_corpus,
    text_facts,
)
from mmgpt.data.sources import TEXT_PROMPT, CocoCaptions, Mixture, TextFile, VQAJsonl
from mmgpt.prompts import CAPTION_PROMPT, IMAGE, encode_conversation


def pixel_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Shapes


def test_shapes_deterministic_across_instances_and_access_order():
    a, b = ShapesDataset("train", 20), ShapesDataset("train", 20)
    indices = list(range(len(a)))
    random.Random(0).shuffle(indices)  # b is read in another order: items must not depend on history
    first = {i: a[i] for i in range(len(a))}
    for i in indices:
        x, y = first[i], b[i]
        assert (x.prompt, x.target, x.id, x.task, x.qtype, x.answers) == (
            y.prompt,
            y.target,
            y.id,
            y.task,
            y.qtype,
            y.answers,
        )
        assert (x.image is None) == (y.image is None)
        if x.image is not None:
            assert pixel_hash(x.image) == pixel_hash(y.image)
    assert pixel_hash(a[0].image) == pixel_hash(a[0].image)  # and twice on the same instance


def test_shapes_seed_changes_data():
    a, b = ShapesDataset("train", 5), ShapesDataset("train", 5, ShapesConfig(seed=1))
    assert [pixel_hash(a[i].image) for i in range(0, 25, 5)] != [
        pixel_hash(b[i].image) for i in range(0, 25, 5)
    ]


def test_shapes_splits_are_disjoint():
    n = 60
    hashes = {}
    for split in ("train", "val", "test"):
        ds = ShapesDataset(split, n, tasks=("caption",))
        hashes[split] = {pixel_hash(ds[i].image) for i in range(n)}
        assert len(hashes[split]) == n  # no two scenes of a split are identical either
    assert not hashes["train"] & hashes["test"]
    assert not hashes["train"] & hashes["val"]
    assert not hashes["val"] & hashes["test"]


def test_shapes_layout_and_ids():
    ds = ShapesDataset("test", 4)
    assert ds.slots == ["cap", "q0", "q1", "q2", "t0"] and len(ds) == 4 * 5
    assert ds.locate(17) == (3, "q1")
    s = ds[17]
    assert s.id == "shapes/test/3/q1" and s.task == "vqa" and s.qtype in QTYPES and s.image is not None
    assert ds[-1].id == "shapes/test/3/t0"
    with pytest.raises(IndexError):
        ds[len(ds)]
    cap = ds[0]
    assert cap.task == "caption" and cap.prompt == CAPTION_PROMPT and cap.target == caption(ds.scene(0))
    # Text share follows text_fraction; text alone gives one text sample per index.
    assert ShapesDataset("train", 1, qa_per_scene=4, text_fraction=0.5).slots.count("t0") == 1
    assert len(ShapesDataset("train", 1, qa_per_scene=4, text_fraction=0.5).slots) == 10
    assert ShapesDataset("train", 3, tasks=("text",)).slots == ["t0"]
    assert ShapesDataset("train", 1, text_fraction=0.0).slots == ["cap", "q0", "q1", "q2"]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("dev", 1)


def test_text_samples_have_no_image():
    ds = ShapesDataset("train", 30)
    texts = [ds[i] for i in range(len(ds)) if ds.locate(i)[1].startswith("t")]
    assert len(texts) == 30
    assert all(s.image is None and s.task == "text" and s.prompt and s.target for s in texts)
    assert len({s.prompt for s in texts}) > 15  # drawn from the pool, not one fact repeated
    facts = text_facts()
    assert len({p for p, _ in facts}) == len(facts) >= 300
    assert dict(facts)["How many sides does a triangle have?"] == "three"
    assert dict(facts)["Count from two to five."] == "two three four five"
    assert dict(facts)["What comes after three?"] == "four"


def test_caption_matches_scene():
    ds = ShapesDataset("val", 50)
    for s in range(50):
        scene, cap = ds.scene(s), ds[s * ds.slots_per_scene].target
        assert cap.endswith(".") and cap == cap.lower()
        phrases = re.split(r", | and ", cap[:-1])
        assert len(phrases) == len(scene.shapes)
        for phrase, spec in zip(phrases, scene.shapes, strict=True):
            assert re.fullmatch(rf"an? {spec.size} {spec.color} {spec.shape} at the {spec.position}", phrase)


def check_answer(question: str, answer: str, scene: Scene, config: ShapesConfig) -> None:
    """Recompute the answer to a templated question from the scene spec alone."""
    shapes = scene.shapes
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (spec,) = [s for s in shapes if s.shape == m[1]]  # must name exactly one shape
        assert answer == spec.color
    elif m := re.fullmatch(r"What color is the shape at the ([\w ]+)\?", question):
        assert answer == next(s.color for s in shapes if s.position == m[1])
    elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (spec,) = [s for s in shapes if s.color == m[1]]
        assert answer == spec.shape
    elif m := re.fullmatch(r"What shape is at the ([\w ]+)\?", question):
        assert answer == next(s.shape for s in shapes if s.position == m[1])
    elif question == "How many shapes are there?":
        assert answer == NUMBER_WORDS[len(shapes)]
    elif m := re.fullmatch(r"How many (\w+)s are there\?", question):
        assert answer == NUMBER_WORDS[sum(s.shape == m[1] for s in shapes)]
    elif m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        assert answer == NUMBER_WORDS[sum(s.color == m[1] for s in shapes)]
    elif m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (spec,) = [s for s in shapes if (s.color, s.shape) == (m[1], m[2])]
        assert answer == spec.position
    elif m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        assert m[1] in config.colors and m[2] in config.shapes
        assert answer == ("yes" if any((s.color, s.shape) == (m[1], m[2]) for s in shapes) else "no")
    else:
        raise AssertionError(f"unknown question template: {question!r}")


def test_answers_follow_scene_spec():
    ds = ShapesDataset("train", 200, tasks=("vqa",), qa_per_scene=4)
    qtypes, yes = Counter(), []
    for i in range(len(ds)):
        s = ds[i]
        scene = ds.scene(ds.locate(i)[0])
        check_answer(s.prompt, s.target, scene, ds.config)
        assert s.answers == [s.target] and s.target == s.target.lower()
        qtypes[s.qtype] += 1
        if s.qtype == "yesno":
            yes.append(s.target == "yes")
    # Every qtype is asked, roughly evenly (4 questions cycled over 5 types from a random start).
    assert set(qtypes) == set(QTYPES) and min(qtypes.values()) > 0.12 * len(ds)
    assert 0.4 < sum(yes) / len(yes) < 0.6  # balanced yes/no, so "always yes" is not a strategy
    # Questions of one scene are distinct.
    assert all(len({ds[4 * s + k].prompt for k in range(4)}) == 4 for s in range(50))


def test_qtypes_asks_only_those_types_and_the_data_source_passes_them():
    wanted = ("yesno", "position", "color", "count")
    ds = DataSource("shapes", size=200, tasks=("vqa",), qtypes=wanted, qa_per_scene=4, qa_turns=4,
                    text_fraction=0.0).build("train", ShapesConfig())
    assert ds.slots == ["c0"]  # no caption, no text: one conversation of four a scene
    asked, yes = Counter(), []
    for s in range(200):
        scene, qas = ds.scene(s), ds.questions(s)
        for qa in qas:
            check_answer(qa.question, qa.answer, scene, ds.config)
        # Four questions, one of each wanted type: none falls back to a second family of its type.
        assert sorted(qa.qtype for qa in qas) == sorted(wanted)
        asked.update(qa.qtype for qa in qas)
        yes += [qa.answer == "yes" for qa in qas if qa.qtype == "yesno"]
    assert set(asked) == set(wanted)
    assert 0.4 < sum(yes) / len(yes) < 0.6
    # The same scenes as a source of every type: qtypes changes the questions, never the images.
    every = ShapesDataset("train", 200, tasks=("vqa",), qa_per_scene=4)
    assert all(ds.scene(s) == every.scene(s) for s in range(20))
    with pytest.raises(ValueError, match=r"qtypes=\['colour'\]; expected a non-empty subset"):
        ShapesDataset("train", 1, qtypes=("colour",))


def test_qa_turns_groups_a_scenes_questions_into_conversations(tokenizer):
    single = ShapesDataset("train", 3, qa_per_scene=5, text_fraction=0.0)
    grouped = ShapesDataset("train", 3, qa_per_scene=5, text_fraction=0.0, qa_turns=2)
    assert grouped.slots == ["cap", "c0", "c1", "c2"]  # 2 + 2 + 1 questions
    for scene in range(3):
        questions = [single[scene * 6 + 1 + k] for k in range(5)]  # the same scene's single-turn samples
        convs = [grouped[scene * 4 + 1 + k] for k in range(3)]
        assert [c.id for c in convs] == [f"shapes/train/{scene}/c{k}" for k in range(3)]
        turns = [m for c in convs for m in c.messages]
        # Every question once, in slot order, as alternating user / assistant turns; the image in the first only.
        assert [m["content"] for m in turns if m["role"] == "assistant"] == [q.target for q in questions]
        users = [m["content"] for m in turns if m["role"] == "user"]
        assert users == [IMAGE + questions[0].prompt, questions[1].prompt,
                         IMAGE + questions[2].prompt, questions[3].prompt, IMAGE + questions[4].prompt]
        for k, c in enumerate(convs):
            first = questions[2 * k]
            assert (c.prompt, c.target, c.qtype, c.task) == (first.prompt, first.target, first.qtype, "vqa")
            # What evaluation generates from is exactly the single-turn question's prompt.
            assert c.conversation(with_answer=False) == first.conversation(with_answer=False)
            assert np.array_equal(np.asarray(c.image), np.asarray(first.image))
    # Length grouping sees a conversation's whole text.
    assert grouped.lengths()[1] == sum(len(single[i].prompt) + len(single[i].target) for i in (1, 2))
    # Trained on, a conversation supervises every answer and nothing of the questions.
    image_seq_len = 4
    ids, supervised, turns = encode_conversation(tokenizer, grouped[1].conversation(), image_seq_len)
    assert len(turns) == 2
    learned = tokenizer.decode([t for t, s in zip(ids, supervised, strict=True) if s])
    answers = [m["content"] for m in grouped[1].messages if m["role"] == "assistant"]
    assert all(a in learned for a in answers) and not any(single[i].prompt in learned for i in (1, 2))
    with pytest.raises(ValueError, match="qa_turns >= 1"):
        ShapesDataset("train", 1, qa_turns=0)


def test_rendered_shapes_have_their_colour_at_their_centre():
    config = ShapesConfig()
    rng = random.Random(0)
    palette = np.array(list(config.colors.values()), dtype=np.int32)  # (C, 3)
    for _ in range(200):
        scene = random_scene(rng, config)
        image = render_scene(scene, config.image_size)
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image)
        for spec in scene.shapes:
            x, y = spec.center(config.image_size)
            assert tuple(pixels[round(y), round(x)]) == spec.rgb
        # Shapes never overlap: each sits inside its own grid cell.
        for spec in scene.shapes:
            (x, y), r, cell = spec.center(64), spec.radius(64), 64 / 3
            assert spec.col * cell <= x - r and x + r <= (spec.col + 1) * cell
            assert spec.row * cell <= y - r and y + r <= (spec.row + 1) * cell
        # The background (a corner is always empty of shapes unless its cell is used) is far from every
        # shape colour, so a pixel's colour says whether it belongs to a shape.
        used = {(s.row, s.col) for s in scene.shapes}
        for row, col, py, px in ((0, 0, 0, 0), (2, 2, 63, 63), (0, 2, 0, 63), (2, 0, 63, 0)):
            if (row, col) not in used:
                dist = np.abs(palette - pixels[py, px].astype(np.int32)).max(axis=1)
                assert dist.min() > 100


def test_config_validation():
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesConfig(max_shapes=10)
    with pytest.raises(ValueError, match="min_shapes"):
        ShapesConfig(min_shapes=0)
    with pytest.raises(ValueError, match="hexagon"):
        ShapesConfig(shapes=("circle", "hexagon"))
    # Lists (as YAML gives them) become tuples, and a bigger image works.
    config = ShapesConfig(colors={"red": [220, 30, 30], "blue": [30, 70, 220]}, image_size=128, max_shapes=4)
    s = ShapesDataset("train", 2, config)[0]
    assert s.image.size == (128, 128) and set(re.findall(r"red|blue", s.target)) <= {"red", "blue"}


def test_shapes_corpus_covers_vocabulary():
    text = " ".join(shapes_corpus(20))
    words = set(re.findall(r"[a-z]+", text.lower()))
    for w in [
        *ShapesConfig().colors,
        "circle",
        "square",
        "triangle",
        "small",
        "large",
        "yes",
        "no",
        *" ".join(POSITIONS).split(),
        *NUMBER_WORDS,
    ]:
        assert w in words
    assert CAPTION_PROMPT in text


# ---------------------------------------------------------------------------------------------------------
# On-disk loaders


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
