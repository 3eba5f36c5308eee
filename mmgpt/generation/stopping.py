"""When a sequence ends besides its end-of-sequence token: stop strings, read from the decoded tail."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase


def cut_at_stop_string(text: str, stop_strings: Sequence[str] | None) -> tuple[str, bool]:
    """The text before the earliest stop string (which is not returned), and whether one was found."""
    ends = [i for i in (text.find(s) for s in stop_strings or ()) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


class StopStrings:
    """Tells whether a row's newest token completed a stop string (``GenerationConfig`` checked the strings)."""

    def __init__(self, stop_strings: Sequence[str], tokenizer: PreTrainedTokenizerBase | None) -> None:
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer to read the generated text: pass tokenizer=...")
        self.strings, self.tokenizer = list(stop_strings), tokenizer
        # Only the tail is decoded: a token is at least one byte, so the last `window` tokens hold any stop
        # string that ends in the newest one, plus a character cut at the window's start.
        self.window = max(len(s.encode()) for s in self.strings) + 4

    def hit(self, ids: torch.Tensor | Sequence[int]) -> bool:
        """Whether the tail of ``ids`` (a row's tokens so far), decoded, holds a stop string."""
        tail = ids[-self.window :]
        tail = self.tokenizer.decode(tail.tolist() if isinstance(tail, torch.Tensor) else list(tail),
                                     skip_special_tokens=True)
        return any(s in tail for s in self.strings)
