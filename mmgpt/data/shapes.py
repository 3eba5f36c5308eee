"""``ShapesDataset``: the samples of the built-in shapes world, for training and testing without downloads.

Each scene gives a caption sample, question samples (single questions or multi-turn conversations) and text-only
samples; ``shapes_corpus`` gives all of that text for training a tokenizer. Everything is a pure function of
``(config.seed, split, index)`` hashed with SHA-256: the same index gives the same sample and the same pixels in
any process, in any access order, with any number of workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch

from mmgpt.data.sample import TASKS, Sample, Task
from mmgpt.data.scenes import MIN_IMAGE_SIDE, POSITIONS, Scene, ShapesConfig, random_scene, render_scene, stable_seed
from mmgpt.data.shapes_language import (
    NUMBER_WORDS,
    QA,
    QTYPES,
    QType,
    candidate_questions,
    caption,
    sample_questions,
    text_facts,
)
from mmgpt.prompts import CAPTION_PROMPT, conversation

SPLITS = ("train", "val", "test")

# The defaults of a shapes source, here once: ``DataSource`` (a YAML ``data.train`` entry) starts from them too.
DEFAULT_SCENES = 1000
DEFAULT_QA_PER_SCENE = 3  # covers most question types of a scene without repeating one
DEFAULT_TEXT_FRACTION = 0.2  # enough text-only samples that the model keeps plain text generation
DEFAULT_QA_TURNS = 1  # one question per VQA sample; conversations are opt-in


class ShapesDataset(torch.utils.data.Dataset):
    """Scenes of coloured shapes with captions, questions and text-only samples.

    Layout: scene ``s`` owns the ``samples_per_scene`` consecutive indices starting at ``s * samples_per_scene``,
    one per name of ``sample_names``, in this order: ``"cap"`` (if "caption" in tasks),
    ``"q0".."q{qa_per_scene-1}"`` (if "vqa"), then ``"t0".."t{text_per_scene-1}"`` (if "text"). The sample id
    is ``shapes/{split}/{scene}/{name}``, e.g. ``shapes/test/17/q2``. With the defaults a scene gives 5 samples:
    a caption, 3 questions and 1 text. With ``qa_turns > 1`` the questions come as multi-turn conversations of
    ``qa_turns`` questions each (the last may be shorter), named ``"c0"``, ``"c1"``, ...: LLaVA-1.5's grouping of
    an image's questions, which pays for the image, the system prompt and the template once per conversation
    instead of once per question. Such a sample's ``prompt``/``target`` are its first question and answer (what
    evaluation asks).

    The number of text samples per scene is ``round(text_fraction * image_samples / (1 - text_fraction))`` (at
    least one when the fraction is positive), so the real text share is ``text_per_scene / samples_per_scene``;
    with text alone, each scene index gives one text sample.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; each split has its own seed stream.
        size: number of scenes.
        config: the shape world; default ``ShapesConfig()``.
        tasks: which kinds of sample to produce.
        qa_per_scene: questions per scene, qtypes cycled from a random start.
        text_fraction: wanted share of text-only samples, in [0, 1).
        qa_turns: questions per VQA sample; 1 gives single-turn samples, more gives conversations.
        qtypes: the question types asked (default: all of ``QTYPES``): a subset gives extra practice on the
            hard ones, e.g. ``("yesno", "position")`` beside a source of every type.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = DEFAULT_SCENES,
        config: ShapesConfig | None = None,
        tasks: Sequence[Task] = TASKS,
        qa_per_scene: int = DEFAULT_QA_PER_SCENE,
        text_fraction: float = DEFAULT_TEXT_FRACTION,
        qa_turns: int = DEFAULT_QA_TURNS,
        qtypes: Sequence[QType] = QTYPES,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"ShapesDataset: split={split!r}; expected one of {SPLITS}")
        if unknown := set(tasks) - set(TASKS):
            raise ValueError(f"ShapesDataset: unknown tasks {sorted(unknown)}; expected {', '.join(TASKS)}")
        if not tasks or size < 0 or qa_per_scene < 0 or qa_turns < 1 or not 0 <= text_fraction < 1:
            raise ValueError(
                f"ShapesDataset: need tasks, size >= 0, qa_per_scene >= 0, qa_turns >= 1 and text_fraction in "
                f"[0, 1); got {tasks=}, {size=}, {qa_per_scene=}, {qa_turns=}, {text_fraction=}"
            )
        if not qtypes or set(qtypes) - set(QTYPES):
            raise ValueError(f"ShapesDataset: qtypes={list(qtypes)}; expected a non-empty subset of {list(QTYPES)}")
        self.qtypes = tuple(qtypes)
        self.split, self.size, self.config = split, size, config or ShapesConfig()
        names = ["cap"] if "caption" in tasks else []
        if "vqa" in tasks and qa_turns == 1:
            names += [f"q{k}" for k in range(qa_per_scene)]
        elif "vqa" in tasks:
            names += [f"c{k}" for k in range(math.ceil(qa_per_scene / qa_turns))]
        self.qa_turns = qa_turns
        n_text = 0
        if "text" in tasks and not names:
            n_text = 1  # text alone: one text sample per index
        elif "text" in tasks and text_fraction > 0:
            # text / (image + text) = text_fraction, rounded to whole samples but never rounded away.
            n_text = max(1, round(text_fraction * len(names) / (1 - text_fraction)))
        self.sample_names = names + [f"t{k}" for k in range(n_text)]
        if not self.sample_names:
            raise ValueError(f"ShapesDataset: {tasks=}, {qa_per_scene=}, {text_fraction=} give no samples")
        self.qa_per_scene = qa_per_scene if "vqa" in tasks else 0
        self.facts = text_facts(self.config)

    @property
    def samples_per_scene(self) -> int:
        return len(self.sample_names)

    def __len__(self) -> int:
        return self.size * self.samples_per_scene

    def locate(self, index: int) -> tuple[int, str]:
        """``(scene index, sample name)`` of a dataset index, per the layout in the class docstring."""
        if not 0 <= index < len(self):
            raise IndexError(f"ShapesDataset({self.split}): index {index} out of range [0, {len(self)})")
        return index // self.samples_per_scene, self.sample_names[index % self.samples_per_scene]

    def _rng(self, scene_index: int, *stream: object) -> random.Random:
        # One independent stream per (base seed, split, scene, purpose): splits never share a stream,
        # and drawing questions never shifts the scene's own random numbers.
        return random.Random(stable_seed("shapes", self.config.seed, self.split, scene_index, *stream))

    def scene(self, scene_index: int) -> Scene:
        """The scene spec behind scene ``scene_index`` (ground truth for tests and evaluation)."""
        return random_scene(self._rng(scene_index, "scene"), self.config)

    def image_size(self, scene_index: int) -> int | tuple[int, int]:
        """The size scene ``scene_index`` is drawn at: ``config.image_size``, or ``(width, height)`` drawn from
        ``config.size_range`` and ``config.max_aspect`` on a stream of its own (the scene and its questions are the
        same at any size)."""
        if self.config.size_range is None:
            return self.config.image_size
        rng = self._rng(scene_index, "size")
        if self.config.max_aspect is None:
            return rng.randint(*self.config.size_range), rng.randint(*self.config.size_range)
        long = rng.randint(*self.config.size_range)
        short = max(MIN_IMAGE_SIDE, round(long / rng.uniform(1.0, self.config.max_aspect)))
        return (long, short) if rng.random() < 0.5 else (short, long)

    def questions(self, scene_index: int, scene: Scene | None = None) -> list[QA]:
        """The questions of scene ``scene_index``, in sample order q0, q1, ... (``scene``: its spec, if at hand)."""
        scene = scene if scene is not None else self.scene(scene_index)
        return sample_questions(scene, self._rng(scene_index, "qa"), self.config, self.qa_per_scene, self.qtypes)

    def lengths(self) -> list[int]:
        """Characters of prompt + answer per index, without drawing any image (for length-grouped batching)."""
        out = []
        for s in range(self.size):
            scene = self.scene(s)
            qas = self.questions(s, scene) if self.qa_per_scene else []
            for k, name in enumerate(self.sample_names):
                if name == "cap":
                    out.append(len(CAPTION_PROMPT) + len(caption(scene)))
                elif name.startswith("q"):
                    qa = self._question(qas, name)
                    out.append(len(qa.question) + len(qa.answer))
                elif name.startswith("c"):
                    out.append(sum(len(qa.question) + len(qa.answer) for qa in self._turns(qas, name)))
                else:  # a text sample draws no image: build it
                    sample = self[s * self.samples_per_scene + k]
                    out.append(len(sample.prompt) + len(sample.target))
        return out

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += len(self)
        s, name = self.locate(index)
        sid = f"shapes/{self.split}/{s}/{name}"
        if name.startswith("t"):
            prompt, target = self.facts[self._rng(s, "text", name).randrange(len(self.facts))]
            return Sample(prompt=prompt, target=target, image=None, task="text", id=sid)
        scene = self.scene(s)
        image = render_scene(scene, self.image_size(s))
        if name == "cap":
            return Sample(prompt=CAPTION_PROMPT, target=caption(scene), image=image, task="caption", id=sid)
        qas = self.questions(s, scene)
        if name.startswith("c"):
            first, *rest = self._turns(qas, name)
            messages = conversation(first.question, first.answer, num_images=1)  # the image goes with the first
            for qa in rest:
                messages += conversation(qa.question, qa.answer)
            return Sample(prompt=first.question, target=first.answer, image=image, task="vqa", id=sid,
                          qtype=first.qtype, messages=messages)
        qa = self._question(qas, name)
        return Sample(prompt=qa.question, target=qa.answer, image=image, task="vqa", id=sid, qtype=qa.qtype)

    @staticmethod
    def _question(qas: list[QA], name: str) -> QA:
        # Question sample "q{k}": a tiny scene can run out of distinct questions; reuse one rather than fail the layout.
        return qas[int(name[1:]) % len(qas)]

    def _turns(self, qas: list[QA], name: str) -> list[QA]:
        # Conversation sample "c{k}": questions k*qa_turns onwards. A scene with fewer distinct questions than asked
        # for repeats none: its later conversations reuse its first questions (as a single-turn sample would).
        k = int(name[1:])
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
