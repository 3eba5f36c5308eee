"""The default model shipped in assets/default_model: it loads offline and really answers held-out questions."""

from __future__ import annotations

import json

import pytest

import mmgpt
from mmgpt.data import ShapesConfig, ShapesDataset
from mmgpt.eval.metrics import exact_match, vqa_score
from mmgpt.pipeline import DEFAULT_MODEL

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "config.yaml").is_file(), reason="no default model shipped in assets/default_model"
)


@pytest.fixture(scope="module")
def default_model():
    return mmgpt.load()


def test_answers_held_out_questions(default_model):
    # The first 12 scenes of the test split (disjoint seeds from training): 36 questions of every type.
    image_size = default_model.processor.img_size
    ds = ShapesDataset("test", size=12, config=ShapesConfig(image_size=image_size))
    samples = [ds[i] for i in range(len(ds)) if ds[i].task == "vqa"]
    answers = default_model.generate([s.image for s in samples], [s.prompt for s in samples])
    accuracy = sum(vqa_score(a, s.answers) for a, s in zip(answers, samples, strict=True)) / len(samples)
    assert accuracy >= 0.95, list(zip([s.prompt for s in samples], answers, [s.target for s in samples], strict=True))


def test_captions_held_out_scenes(default_model):
    image_size = default_model.processor.img_size
    ds = ShapesDataset("test", size=12, config=ShapesConfig(image_size=image_size), tasks=("caption",))
    captions = default_model.generate([ds[i].image for i in range(12)], [None] * 12)
    correct = sum(exact_match(c, ds[i].answers) for i, c in enumerate(captions))
    assert correct >= 11, captions


def test_shipped_examples_and_the_one_line_api():
    examples = json.loads((DEFAULT_MODEL.parent / "examples" / "examples.json").read_text())
    for ex in examples:
        path = DEFAULT_MODEL.parent / "examples" / ex["file"]
        qa = ex["questions"][0]
        assert exact_match(mmgpt.generate(str(path), qa["question"]), [qa["answer"]]) == 1.0
    # Text-only prompts get the right text answers (facts from the text share of the training mix).
    assert mmgpt.generate(None, "How many sides does a triangle have?") == "three"
    assert mmgpt.generate(None, "What is two plus five?") == "seven"
