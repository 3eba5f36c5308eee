"""Tests for the language about a scene: the caption and every answer agree with the scene spec."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from mmgpt.data import DataSource, ShapesConfig, ShapesDataset
from mmgpt.data.scenes import Scene
from mmgpt.data.shapes_language import NUMBER_WORDS, QTYPES


def test_caption_matches_scene():
    ds = ShapesDataset("val", 50)
    for s in range(50):
        scene, cap = ds.scene(s), ds[s * ds.samples_per_scene].target
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
    assert ds.sample_names == ["c0"]  # no caption, no text: one conversation of four a scene
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
