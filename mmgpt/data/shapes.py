"""Shapes: a procedurally generated world of coloured shapes, for training and testing without downloads.

A scene holds 1..3 shapes (circle, square, triangle), each with a colour, a size and a cell of a 3x3 grid,
painted with PIL on a pastel background. Captions and answers are templated from the scene, so every target
is an exact string a small model can learn, and every answer can be checked against the scene spec.

Everything is a pure function of ``(config.seed, split, index)`` hashed with SHA-256: the same index gives
the same sample and the same pixels in any process, in any access order, with any number of workers.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmgpt.data.sample import Sample, Task
from mmgpt.prompts import CAPTION_PROMPT, conversation

RGB = tuple[int, int, int]

# Saturated, far apart colours: each one has a channel below 60, so none can be mistaken for the pastel
# backgrounds (every channel above 190) and the model never has to guess between two near shades.
DEFAULT_COLORS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 205, 20),
    "purple": (140, 50, 180),
    "orange": (245, 125, 20),
}

# Word names of the 3x3 grid cells in reading order; the middle cell is just "center".
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = tuple("center" if (r, c) == ("middle", "center") else f"{r} {c}" for r in ROWS for c in COLS)

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()

QType = Literal["color", "shape", "count", "position", "yesno"]
QTYPES: tuple[QType, ...] = ("color", "shape", "count", "position", "yesno")
SPLITS = ("train", "val", "test")

# Half-extent of a shape as a fraction of half a grid cell: large shapes nearly fill their cell, small ones
# leave room to jitter. Both stay below 1 so shapes in neighbouring cells can never touch.
SIZE_SCALE = {"small": 0.45, "large": 0.8}

# Sides (and corners) of the shapes we know facts about, for the text-only samples.
SIDES = {"circle": 0, "triangle": 3, "square": 4}


@dataclass
class ShapesConfig:
    """How scenes are drawn. Scenes are a pure function of this config and ``(split, index)``."""

    image_size: int = 64  # a small shape is still ~10 px wide; a scene renders in well under 1 ms
    min_shapes: int = 1  # a single shape keeps "the circle" questions unambiguous and easy to start with
    max_shapes: int = 3  # enough for counting and "which one" questions, still quick to learn
    colors: dict[str, RGB] = field(default_factory=lambda: dict(DEFAULT_COLORS))  # name -> RGB, see above
    shapes: tuple[str, ...] = ("circle", "square", "triangle")  # render_scene knows how to draw these three
    sizes: tuple[str, ...] = ("small", "large")  # two sizes: distinguishable at 64 px, and in every caption
    noise_levels: tuple[float, ...] = (0.0, 0.0, 4.0, 8.0)  # std of pixel noise; half the scenes are clean
    gradient_prob: float = 0.5  # share of backgrounds fading between two pastels rather than one plain colour
    seed: int = 0  # base seed; each split and index derives its own stream from it

    def __post_init__(self) -> None:
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise ValueError(
                f"ShapesConfig: need 1 <= min_shapes <= max_shapes, got {self.min_shapes}, {self.max_shapes}"
            )
        # Shapes sit in distinct grid cells and carry distinct (colour, kind) pairs, so both bound the count.
        limit = min(len(POSITIONS), len(self.colors) * len(self.shapes))
        if self.max_shapes > limit:
            raise ValueError(
                f"ShapesConfig: max_shapes={self.max_shapes} but at most {limit} shapes fit "
                f"({len(POSITIONS)} grid cells, {len(self.colors)} colours x {len(self.shapes)} kinds)"
            )
        if unknown := set(self.shapes) - set(SIDES):
            raise ValueError(f"ShapesConfig: unknown shapes {sorted(unknown)}; known: {sorted(SIDES)}")
        if unknown := set(self.sizes) - set(SIZE_SCALE):
            raise ValueError(f"ShapesConfig: unknown sizes {sorted(unknown)}; known: {sorted(SIZE_SCALE)}")
        # YAML and jsonargparse hand us lists; the rest of the code wants hashable tuples.
        self.colors = {name: tuple(int(v) for v in rgb) for name, rgb in self.colors.items()}
        self.shapes, self.sizes = tuple(self.shapes), tuple(self.sizes)


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene: what it is (colour, kind, size) and where (grid cell plus a jitter)."""

    color: str
    rgb: RGB
    shape: str
    size: str
    row: int
    col: int
    dx: float = 0.0  # jitter in [-1, 1], a fraction of the free room left in the cell
    dy: float = 0.0

    @property
    def position(self) -> str:
        """The cell in words, e.g. "top left" or "center"."""
        return POSITIONS[3 * self.row + self.col]

    def radius(self, image_size: int) -> float:
        """Half-extent of the shape in pixels."""
        return SIZE_SCALE[self.size] * image_size / 6

    def center(self, image_size: int) -> tuple[float, float]:
        """Centre of the shape in pixels ``(x, y)``."""
        half_cell = image_size / 6
        # Room to move without leaving the cell (1 px margin), so neighbours never overlap.
        room = max(0.0, half_cell - self.radius(image_size) - 1)
        x = (2 * self.col + 1) * half_cell + self.dx * room
        y = (2 * self.row + 1) * half_cell + self.dy * room
        return x, y


@dataclass(frozen=True)
class Scene:
    """A full scene: shapes in reading order of their cells, and a background."""

    shapes: tuple[ShapeSpec, ...]
    bg_from: RGB = (235, 235, 235)
    bg_to: RGB = (235, 235, 235)  # equal to bg_from for a plain background
    bg_angle: float = 0.0  # direction of the gradient, radians
    noise: float = 0.0  # std of the Gaussian pixel noise
    noise_seed: int = 0


@dataclass(frozen=True)
class QA:
    """A question about a scene with its single correct short answer."""

    question: str
    answer: str
    qtype: str


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, identical in every process.

    Python's ``hash()`` of a string changes per process (PYTHONHASHSEED), which would give each DataLoader
    worker a different dataset; SHA-256 of the parts' text does not.
    """
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def _pastel(rng: random.Random) -> RGB:
    # High lightness keeps every channel above ~190, far from the saturated shape colours.
    r, g, b = colorsys.hls_to_rgb(rng.random(), rng.uniform(0.85, 0.95), rng.uniform(0.2, 0.6))
    return round(255 * r), round(255 * g), round(255 * b)


def random_scene(rng: random.Random, config: ShapesConfig) -> Scene:
    """Draw a random scene.

    Args:
        rng: the random stream; the scene is a pure function of its state.
        config: the shape world (colours, kinds, sizes, number of shapes).

    Returns:
        A scene with distinct cells and distinct (colour, kind) pairs, so every question has one answer.
    """
    n = rng.randint(config.min_shapes, config.max_shapes)
    cells = sorted(rng.sample(range(len(POSITIONS)), n))  # sorted = reading order, the caption's order
    pairs = rng.sample([(c, s) for c in config.colors for s in config.shapes], n)
    shapes = tuple(
        ShapeSpec(
            color=c,
            rgb=config.colors[c],
            shape=s,
            size=rng.choice(config.sizes),
            row=cell // 3,
            col=cell % 3,
            dx=rng.uniform(-1, 1),
            dy=rng.uniform(-1, 1),
        )
        for cell, (c, s) in zip(cells, pairs, strict=True)
    )
    bg_from = _pastel(rng)
    bg_to = _pastel(rng) if rng.random() < config.gradient_prob else bg_from
    return Scene(
        shapes=shapes,
        bg_from=bg_from,
        bg_to=bg_to,
        bg_angle=rng.uniform(0, 2 * math.pi),
        noise=rng.choice(config.noise_levels),
        noise_seed=rng.getrandbits(32),
    )


@functools.lru_cache(maxsize=8)
def _pixel_grid(image_size: int) -> np.ndarray:
    # Read-only: shared by every scene of this size (the training loop draws thousands a second).
    grid = np.mgrid[0:image_size, 0:image_size].astype(np.float32)  # (2, S, S): rows, columns
    grid.flags.writeable = False
    return grid


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Paint a scene.

    Args:
        scene: what to draw.
        image_size: side of the square image in pixels.

    Returns:
        An RGB image; a pure function of its arguments.
    """
    # Background: a linear blend from bg_from to bg_to along bg_angle, plus optional Gaussian noise.
    ys, xs = _pixel_grid(image_size)  # (S, S) each
    d = math.cos(scene.bg_angle) * xs + math.sin(scene.bg_angle) * ys
    t = (d - d.min()) / max(float(d.max() - d.min()), 1e-6)  # (S, S) in [0, 1]
    lo, hi = np.array(scene.bg_from, np.float32), np.array(scene.bg_to, np.float32)
    pixels = lo + t[..., None] * (hi - lo)  # (S, S, 3)
    if scene.noise > 0:
        pixels += np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")

    # Shapes are drawn without anti-aliasing, so a shape's centre pixel is exactly its colour.
    draw = ImageDraw.Draw(image)
    for spec in scene.shapes:
        (x, y), r = spec.center(image_size), spec.radius(image_size)
        if spec.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=spec.rgb)
        elif spec.shape == "square":
            h = 0.85 * r  # a little smaller than the circle, so both look about the same weight
            draw.rectangle([x - h, y - h, x + h, y + h], fill=spec.rgb)
        elif spec.shape == "triangle":
            # Apex up; the centre pixel stays well inside even for a small triangle.
            w, b = 0.95 * r, y + 0.8 * r  # half base width, base line
            draw.polygon([(x, y - r), (x + w, b), (x - w, b)], fill=spec.rgb)
        else:
            raise ValueError(f"render_scene: cannot draw {spec.shape!r}; expected one of {sorted(SIDES)}")
    return image


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


class ShapesDataset(torch.utils.data.Dataset):
    """Scenes of coloured shapes with captions, questions and text-only samples.

    Layout: scene ``s`` owns the ``slots_per_scene`` consecutive indices starting at ``s * slots_per_scene``,
    in this order: ``"cap"`` (if "caption" in tasks), ``"q0".."q{qa_per_scene-1}"`` (if "vqa"), then
    ``"t0".."t{text_per_scene-1}"`` (if "text"). The sample id is ``shapes/{split}/{scene}/{slot}``, e.g.
    ``shapes/test/17/q2``. With the defaults a scene gives 5 samples: a caption, 3 questions and 1 text.
    With ``qa_turns > 1`` the questions come as multi-turn conversations of ``qa_turns`` questions each
    (the last may be shorter), slots ``"c0"``, ``"c1"``, ...: LLaVA-1.5's grouping of an image's questions,
    which pays for the image, the system prompt and the template once per conversation instead of once per
    question. Such a sample's ``prompt``/``target`` are its first question and answer (what evaluation asks).

    The number of text slots is ``round(text_fraction * image_slots / (1 - text_fraction))`` (at least one
    when the fraction is positive), so the real text share is ``text_per_scene / slots_per_scene``;
    with text alone, each scene index gives one text sample.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; each split has its own seed stream.
        size: number of scenes.
        config: the shape world; default ``ShapesConfig()``.
        tasks: which sample kinds to produce.
        qa_per_scene: questions per scene, qtypes cycled from a random start.
        text_fraction: wanted share of text-only samples, in [0, 1).
        qa_turns: questions per VQA sample; 1 gives single-turn samples, more gives conversations.
        qtypes: the question types asked (default: all of ``QTYPES``): a subset gives extra practice on the
            hard ones, e.g. ``("yesno", "position")`` beside a source of every type.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 1000,
        config: ShapesConfig | None = None,
        tasks: Sequence[Task] = ("caption", "vqa", "text"),
        qa_per_scene: int = 3,
        text_fraction: float = 0.2,
        qa_turns: int = 1,
        qtypes: Sequence[QType] = QTYPES,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"ShapesDataset: split={split!r}; expected one of {SPLITS}")
        if unknown := set(tasks) - {"caption", "vqa", "text"}:
            raise ValueError(f"ShapesDataset: unknown tasks {sorted(unknown)}; expected caption, vqa, text")
        if not tasks or size < 0 or qa_per_scene < 0 or qa_turns < 1 or not 0 <= text_fraction < 1:
            raise ValueError(
                f"ShapesDataset: need tasks, size >= 0, qa_per_scene >= 0, qa_turns >= 1 and text_fraction in "
                f"[0, 1); got {tasks=}, {size=}, {qa_per_scene=}, {qa_turns=}, {text_fraction=}"
            )
        if not qtypes or set(qtypes) - set(QTYPES):
            raise ValueError(f"ShapesDataset: qtypes={list(qtypes)}; expected a non-empty subset of {list(QTYPES)}")
        self.qtypes = tuple(qtypes)
        self.split, self.size, self.config = split, size, config or ShapesConfig()
        slots = ["cap"] if "caption" in tasks else []
        if "vqa" in tasks and qa_turns == 1:
            slots += [f"q{k}" for k in range(qa_per_scene)]
        elif "vqa" in tasks:
            slots += [f"c{k}" for k in range(math.ceil(qa_per_scene / qa_turns))]
        self.qa_turns = qa_turns
        n_text = 0
        if "text" in tasks and not slots:
            n_text = 1  # text alone: one text sample per index
        elif "text" in tasks and text_fraction > 0:
            # text / (image + text) = text_fraction, rounded to whole slots but never rounded away.
            n_text = max(1, round(text_fraction * len(slots) / (1 - text_fraction)))
        self.slots = slots + [f"t{k}" for k in range(n_text)]
        if not self.slots:
            raise ValueError(f"ShapesDataset: {tasks=}, {qa_per_scene=}, {text_fraction=} give no samples")
        self.qa_per_scene = qa_per_scene if "vqa" in tasks else 0
        self.facts = text_facts(self.config)

    @property
    def slots_per_scene(self) -> int:
        return len(self.slots)

    def __len__(self) -> int:
        return self.size * len(self.slots)

    def locate(self, index: int) -> tuple[int, str]:
        """``(scene index, slot name)`` of a dataset index, per the layout in the class docstring."""
        if not 0 <= index < len(self):
            raise IndexError(f"ShapesDataset({self.split}): index {index} out of range [0, {len(self)})")
        return index // len(self.slots), self.slots[index % len(self.slots)]

    def _rng(self, scene_index: int, *stream: object) -> random.Random:
        # One independent stream per (base seed, split, scene, purpose): splits never share a stream,
        # and drawing questions never shifts the scene's own random numbers.
        return random.Random(stable_seed("shapes", self.config.seed, self.split, scene_index, *stream))

    def scene(self, scene_index: int) -> Scene:
        """The scene spec behind scene ``scene_index`` (ground truth for tests and evaluation)."""
        return random_scene(self._rng(scene_index, "scene"), self.config)

    def questions(self, scene_index: int, scene: Scene | None = None) -> list[QA]:
        """The questions of scene ``scene_index``, in slot order q0, q1, ... (``scene``: its spec, if at hand)."""
        scene = scene if scene is not None else self.scene(scene_index)
        return sample_questions(scene, self._rng(scene_index, "qa"), self.config, self.qa_per_scene, self.qtypes)

    def lengths(self) -> list[int]:
        """Characters of prompt + answer per index, without drawing any image (for length-grouped batching)."""
        out = []
        for s in range(self.size):
            scene = self.scene(s)
            qas = self.questions(s, scene) if self.qa_per_scene else []
            for k, slot in enumerate(self.slots):
                if slot == "cap":
                    out.append(len(CAPTION_PROMPT) + len(caption(scene)))
                elif slot.startswith("q"):
                    qa = qas[int(slot[1:]) % len(qas)]
                    out.append(len(qa.question) + len(qa.answer))
                elif slot.startswith("c"):
                    out.append(sum(len(qa.question) + len(qa.answer) for qa in self._turns(qas, slot)))
                else:  # a text sample draws no image: build it
                    sample = self[s * len(self.slots) + k]
                    out.append(len(sample.prompt) + len(sample.target))
        return out

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += len(self)
        s, slot = self.locate(index)
        sid = f"shapes/{self.split}/{s}/{slot}"
        if slot.startswith("t"):
            prompt, target = self.facts[self._rng(s, "text", slot).randrange(len(self.facts))]
            return Sample(prompt=prompt, target=target, image=None, task="text", id=sid)
        scene = self.scene(s)
        image = render_scene(scene, self.config.image_size)
        if slot == "cap":
            return Sample(prompt=CAPTION_PROMPT, target=caption(scene), image=image, task="caption", id=sid)
        qas = self.questions(s, scene)
        if slot.startswith("c"):
            first, *rest = self._turns(qas, slot)
            messages = conversation(first.question, first.answer, num_images=1)  # the image goes with the first
            for qa in rest:
                messages += conversation(qa.question, qa.answer)
            return Sample(prompt=first.question, target=first.answer, image=image, task="vqa", id=sid,
                          qtype=first.qtype, messages=messages)
        k = int(slot[1:])
        # A tiny scene can run out of distinct questions; reuse one rather than fail the layout.
        qa = qas[k % len(qas)]
        return Sample(prompt=qa.question, target=qa.answer, image=image, task="vqa", id=sid, qtype=qa.qtype)

    def _turns(self, qas: list[QA], slot: str) -> list[QA]:
        # Conversation slot "c{k}": questions k*qa_turns onwards. A scene with fewer distinct questions than asked
        # for repeats none: its later conversations reuse its first questions (as a single-turn slot would).
        k = int(slot[1:])
        turns = qas[k * self.qa_turns : (k + 1) * self.qa_turns]
        return turns or qas[: self.qa_turns]


def shapes_corpus(num_scenes: int = 1000, config: ShapesConfig | None = None) -> Iterator[str]:
    """Every kind of text the shapes data contains, for training a tokenizer.

    Args:
        num_scenes: how many train scenes to draw captions and questions from.
        config: the shape world; default ``ShapesConfig()``.

    Yields:
        The caption prompt, the vocabulary words, every text fact (prompt and answer), and for each scene
        its caption and all its candidate questions and answers.
    """
    config = config or ShapesConfig()
    yield CAPTION_PROMPT
    yield " ".join([*config.colors, *config.shapes, *config.sizes, *POSITIONS, *NUMBER_WORDS, "yes", "no"])
    for prompt, target in text_facts(config):
        yield prompt
        yield target
    ds = ShapesDataset("train", num_scenes, config)
    for s in range(num_scenes):
        scene = ds.scene(s)
        yield caption(scene)
        for families in candidate_questions(scene, config).values():
            for family in families:
                for qa in family:
                    yield qa.question
                    yield qa.answer
