"""The one record every data source yields, whatever it was read from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from mmgpt.prompts import conversation

Task = Literal["caption", "vqa", "text"]
TASKS: tuple[Task, ...] = ("caption", "vqa", "text")


@dataclass
class Sample:
    """One training/eval example before tokenization.

    Args:
        prompt: what the user says (the question, the caption instruction, or the text to continue).
        target: what the model must answer; the only supervised text.
        image: the image, or ``None`` for a text-only sample.
        task: ``"caption"``, ``"vqa"`` or ``"text"``; picks metrics and logging, not the template.
        id: a stable name for the sample, used in error messages ("sample shapes/train/17/q2").
        answers: every accepted reference answer (VQA soft score, several captions); defaults to ``[target]``.
        qtype: the question type (``"color"``, ``"shape"``, ``"count"``, ``"position"``, ``"yesno"``)
            so evaluation can report accuracy per type.
        messages: a whole conversation (``[{"role": "user" | "assistant" | "system", "content": ...}]``, with
            an ``<image>`` marker where the image goes) for multi-turn data; every assistant turn is supervised.
            ``None`` means the single turn ``prompt`` -> ``target``.
    """

    prompt: str
    target: str
    image: Image.Image | None = None
    task: Task = "text"
    id: str = ""
    answers: list[str] = field(default_factory=list)
    qtype: str = ""
    messages: list[dict[str, str]] | None = None

    def __post_init__(self) -> None:
        if not self.answers:
            self.answers = [self.target]

    def conversation(self, with_answer: bool = True) -> list[dict[str, str]]:
        """The sample as chat messages: the whole conversation, or (``with_answer=False``) what comes before
        the first answer, to generate from."""
        if self.messages is None:
            return conversation(self.prompt, self.target if with_answer else None, int(self.image is not None))
        if with_answer:
            return self.messages
        first = next((i for i, m in enumerate(self.messages) if m["role"] == "assistant"), len(self.messages))
        return self.messages[:first]
