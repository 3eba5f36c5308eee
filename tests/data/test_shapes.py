"""Tests for the shapes dataset: determinism, layout and ids, text samples, conversations, the tokenizer corpus."""

from __future__ import annotations

import hashlib
import random
import re

import numpy as np
import pytest
from PIL import Image

from mmgpt.data import ShapesConfig, ShapesDataset
from mmgpt.data.scenes import POSITIONS
from mmgpt.data.shapes import shapes_corpus
from mmgpt.data.shapes_language import NUMBER_WORDS, QTYPES, caption, text_facts
from mmgpt.prompts import CAPTION_PROMPT, IMAGE, encode_conversation


def pixel_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


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
    assert ds.sample_names == ["cap", "q0", "q1", "q2", "t0"] and len(ds) == 4 * 5
    assert ds.locate(17) == (3, "q1")
    s = ds[17]
    assert s.id == "shapes/test/3/q1" and s.task == "vqa" and s.qtype in QTYPES and s.image is not None
    assert ds[-1].id == "shapes/test/3/t0"
    with pytest.raises(IndexError):
        ds[len(ds)]
    cap = ds[0]
    assert cap.task == "caption" and cap.prompt == CAPTION_PROMPT and cap.target == caption(ds.scene(0))
    # Text share follows text_fraction; text alone gives one text sample per index.
    assert ShapesDataset("train", 1, qa_per_scene=4, text_fraction=0.5).sample_names.count("t0") == 1
    assert len(ShapesDataset("train", 1, qa_per_scene=4, text_fraction=0.5).sample_names) == 10
    assert ShapesDataset("train", 3, tasks=("text",)).sample_names == ["t0"]
    assert ShapesDataset("train", 1, text_fraction=0.0).sample_names == ["cap", "q0", "q1", "q2"]
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


def test_qa_turns_groups_a_scenes_questions_into_conversations(tokenizer):
    single = ShapesDataset("train", 3, qa_per_scene=5, text_fraction=0.0)
    grouped = ShapesDataset("train", 3, qa_per_scene=5, text_fraction=0.0, qa_turns=2)
    assert grouped.sample_names == ["cap", "c0", "c1", "c2"]  # 2 + 2 + 1 questions
    for scene in range(3):
        questions = [single[scene * 6 + 1 + k] for k in range(5)]  # the same scene's single-turn samples
        convs = [grouped[scene * 4 + 1 + k] for k in range(3)]
        assert [c.id for c in convs] == [f"shapes/train/{scene}/c{k}" for k in range(3)]
        turns = [m for c in convs for m in c.messages]
        # Every question once, in sample order, as alternating user / assistant turns; the image in the first only.
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
