"""The language about a shapes scene: its one caption, the questions it answers, and text-only facts.

Captions and answers are templated from the scene spec, so every target is an exact string a small model can
learn, and every answer can be checked against the scene. Questions are drawn from a random stream the caller
owns, so they are as reproducible as the scene itself.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mmgpt.data.scenes import SIDES, Scene, ShapesConfig

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()

QType = Literal["color", "shape", "count", "position", "yesno"]
QTYPES: tuple[QType, ...] = ("color", "shape", "count", "position", "yesno")


@dataclass(frozen=True)
class QA:
    """A question about a scene with its single correct short answer."""

    question: str
    answer: str
    qtype: str


def caption(scene: Scene) -> str:
    """The one caption of a scene.

    For example "a large red circle at the top left and a small blue square at the center.". Shapes are
    listed in reading order of their cells, so each scene has a single exact caption.
    """
    parts = [f"{_a(s.size)} {s.color} {s.shape} at the {s.position}" for s in scene.shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def _a(word: str) -> str:
    """The word with its indefinite article: "a red", "an orange"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(shape: str) -> str:
    return shape + "s"


def candidate_questions(scene: Scene, config: ShapesConfig) -> dict[str, list[list[QA]]]:
    """Every unambiguous question about a scene, by qtype, grouped in template families.

    Sampling picks a family first and then a question, so that rare templates (there is one "How many
    shapes" but up to nine "How many circles"-like ones) still get asked often.

    Args:
        scene: the scene asked about.
        config: the shape world; "no" questions and zero counts use its colours and kinds.

    Returns:
        ``{qtype: [family, ...]}`` with empty families removed.
    """
    shapes = scene.shapes
    kinds, colors = Counter(s.shape for s in shapes), Counter(s.color for s in shapes)
    present = {(s.color, s.shape) for s in shapes}
    absent = [(c, k) for c in config.colors for k in config.shapes if (c, k) not in present]
    families = {
        "color": [
            # "the circle" names one object only when exactly one circle is present.
            [QA(f"What color is the {s.shape}?", s.color, "color") for s in shapes if kinds[s.shape] == 1],
            [QA(f"What color is the shape at the {s.position}?", s.color, "color") for s in shapes],
        ],
        "shape": [
            [
                QA(f"What shape is the {s.color} object?", s.shape, "shape")
                for s in shapes
                if colors[s.color] == 1
            ],
            [QA(f"What shape is at the {s.position}?", s.shape, "shape") for s in shapes],
        ],
        "count": [
            [QA("How many shapes are there?", NUMBER_WORDS[len(shapes)], "count")],
            [QA(f"How many {_plural(k)} are there?", NUMBER_WORDS[kinds[k]], "count") for k in config.shapes],
            [QA(f"How many {c} shapes are there?", NUMBER_WORDS[colors[c]], "count") for c in config.colors],
        ],
        "position": [[QA(f"Where is the {s.color} {s.shape}?", s.position, "position") for s in shapes]],
        # Two families, "yes" and "no", picked with equal chance: always answering "yes" scores only 50%.
        "yesno": [
            [QA(f"Is there {_a(s.color)} {s.shape}?", "yes", "yesno") for s in shapes],
            [QA(f"Is there {_a(c)} {k}?", "no", "yesno") for c, k in absent],
        ],
    }
    return {q: [f for f in fams if f] for q, fams in families.items()}


def sample_questions(
    scene: Scene, rng: random.Random, config: ShapesConfig, n: int, qtypes: Sequence[QType] = QTYPES
) -> list[QA]:
    """Pick ``n`` distinct questions about a scene, cycling through the qtypes from a random start.

    Args:
        scene: the scene asked about.
        rng: the random stream; the questions are a pure function of its state.
        config: the shape world.
        n: how many questions.
        qtypes: the question types to draw from, in cycling order (default: all of ``QTYPES``).

    Returns:
        ``n`` questions (fewer only if the scene has fewer distinct questions), qtypes as even as possible.
    """
    cands = candidate_questions(scene, config)
    start, picked, seen = rng.randrange(len(qtypes)), [], set()
    for k in range(n * len(qtypes)):  # bounded: a qtype whose questions are all used is skipped
        if len(picked) == n:
            break
        families = cands[qtypes[(start + k) % len(qtypes)]]
        # Family first (for balance), then any question of that qtype not yet asked.
        order = [rng.choice(rng.choice(families))] + [qa for fam in families for qa in fam]
        qa = next((qa for qa in order if qa.question not in seen), None)
        if qa is not None:
            picked.append(qa)
            seen.add(qa.question)
    return picked


def text_facts(config: ShapesConfig | None = None) -> list[tuple[str, str]]:
    """Text-only (prompt, answer) pairs about the shape world, numbers and a few everyday facts.

    These teach the decoder plain question answering and generation without an image. The list is fixed
    (about 360 pairs for the default config) and its order deterministic.

    Args:
        config: the shape world whose colours, kinds and sizes the facts use; default ``ShapesConfig()``.

    Returns:
        Distinct prompts with their short lowercase answers.
    """
    config = config or ShapesConfig()
    w = NUMBER_WORDS
    facts: list[tuple[str, str]] = []
    for shape in config.shapes:
        facts.append((f"How many sides does a {shape} have?", w[SIDES[shape]]))
        facts.append((f"How many corners does a {shape} have?", w[SIDES[shape]]))
    facts += [
        ("Name a shape with three sides.", "triangle"),
        ("Name a shape with four equal sides.", "square"),
        ("Name a round shape.", "circle"),
    ]
    facts += [
        ("What color is the sky on a clear day?", "blue"),
        ("What color is grass?", "green"),
        ("What color is a ripe banana?", "yellow"),
        ("What color is a ripe tomato?", "red"),
        ("What color is an orange?", "orange"),
        ("What color is snow?", "white"),
        ("What color is coal?", "black"),
        ("What color are most leaves in summer?", "green"),
        ("What color do you get by mixing red and yellow?", "orange"),
        ("What color do you get by mixing blue and yellow?", "green"),
        ("What color do you get by mixing red and blue?", "purple"),
    ]
    opposites = [
        ("large", "small"),
        ("top", "bottom"),
        ("left", "right"),
        ("yes", "no"),
        ("up", "down"),
        ("big", "little"),
        ("first", "last"),
        ("more", "less"),
    ]
    for a, b in opposites:
        facts += [(f"What is the opposite of {a}?", b), (f"What is the opposite of {b}?", a)]
    for i in range(20):
        facts.append((f"What comes after {w[i]}?", w[i + 1]))
        facts.append((f"What comes before {w[i + 1]}?", w[i]))
    for a in range(1, 10):
        for b in range(a + 1, min(a + 6, 11)):
            facts.append((f"Count from {w[a]} to {w[b]}.", " ".join(w[a : b + 1])))
    for a in range(11):
        for b in range(11 - a):  # sums up to ten
            facts.append((f"What is {w[a]} plus {w[b]}?", w[a + b]))
            facts.append((f"What is {w[a + b]} minus {w[b]}?", w[a]))
    for a in range(1, 10):
        for b in range(a + 1, 11, 3):
            facts.append((f"Which is bigger, {w[a]} or {w[b]}?", w[b]))
            facts.append((f"Which is smaller, {w[b]} or {w[a]}?", w[a]))
    # Copying a short phrase teaches the decoder the caption vocabulary without any image.
    for size in config.sizes:
        for color in config.colors:
            for shape in config.shapes:
                phrase = f"{_a(size)} {color} {shape}"
                facts.append((f"Repeat after me: {phrase}.", phrase))
    return facts
