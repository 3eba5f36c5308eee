"""The one record every data source yields, whatever it was read from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

Task = Literal["caption", "vqa", "text"]


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
    """

    prompt: str
    target: str
    image: Image.Image | None = None
    task: Task = "text"
    id: str = ""
    answers: list[str] = field(default_factory=list)
    qtype: str = ""

    def __post_init__(self) -> None:
        if not self.answers:
            self.answers = [self.target]
