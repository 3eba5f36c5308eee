"""``GenerationConfig``: how to decode, in HF ``GenerationConfig``'s names and defaults where they overlap.

Torch-free, so a config can be built, printed and validated without the model. ``update`` is how keyword
arguments reach it: every ``generate``/``stream`` takes ``generation_config=`` plus any field as a keyword, and a
keyword that is no field is rejected by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings.

    Args:
        max_new_tokens: the most tokens to generate per sequence.
        do_sample: False picks the most likely token (greedy), as HF's default; True samples with the filters.
        temperature, top_k, top_p, min_p: the sampling filters, in HF's order (``mmgpt.generation.sampling``).
            ``top_k`` None or 0 keeps every token.
        repetition_penalty: HF's (CTRL's) penalty on tokens already in the prompt or output; 1.0 disables it.
        num_return_sequences: sequences per prompt; needs sampling or beam search.
        num_beams: > 1 runs beam search (HF's algorithm; no sampling within it).
        length_penalty: beam search ranks a finished sequence by ``sum(log p) / length ** length_penalty``.
        early_stopping: beam search stops a prompt when ``num_beams`` sequences are finished (True), when a
            heuristic says no better one can come (False, HF's default), or when none can (``"never"``: exact).
        eos_token_id: one id or a list; a sequence ends after emitting one. ``None``: never (``Pipeline`` fills
            in its tokenizer's).
        pad_token_id: fills a finished sequence's remaining positions; ``None`` means 0.
        stop_strings: a sequence also ends once its text contains one (the tokenizer decodes it); the text
            returned by ``Pipeline`` stops before it.
        use_cache: False re-runs the whole sequence every step (slow; the reference the KV cache is tested
            against).
        compile: ``torch.compile`` the decode step (mmgpt's, not an HF field). One graph serves every step and
            length; each batch size compiles once, and finished rows stay in the batch instead of leaving it.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50  # HF's default; only used when sampling
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: list[str] | None = None
    use_cache: bool = True
    compile: bool = False

    def update(self, **kwargs: Any) -> GenerationConfig:
        """A copy with ``kwargs`` changed.

        Raises:
            TypeError: naming every keyword that is not a field (a typo would otherwise be silently ignored).
        """
        names = {f.name for f in fields(self)}
        if unknown := sorted(set(kwargs) - names):
            raise TypeError(
                f"unknown generation argument(s) {unknown}; GenerationConfig takes {sorted(names)}"
            )
        return dataclasses.replace(self, **kwargs) if kwargs else self

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot be decoded, naming the argument."""
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.num_beams > 1:
            if self.do_sample:
                raise ValueError("num_beams > 1 with do_sample=True (beam sampling) is not supported; choose one")
            if self.stop_strings:
                raise ValueError("stop_strings are not supported with beam search; use eos_token_id")
            if not self.use_cache:
                raise ValueError("beam search needs the KV cache (use_cache=True)")
            if self.early_stopping not in (True, False, "never"):
                raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
            if self.num_return_sequences > self.num_beams:
                raise ValueError(
                    f"num_return_sequences={self.num_return_sequences} must be between 1 and "
                    f"num_beams={self.num_beams}"
                )
        elif self.num_return_sequences > 1 and not self.do_sample:
            # HF rejects this too: greedy decoding would return the same sequence n times.
            raise ValueError("num_return_sequences > 1 needs do_sample=True (or num_beams >= num_return_sequences)")

    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a list (empty when unset)."""
        if self.eos_token_id is None:
            return []
        ids = [self.eos_token_id] if isinstance(self.eos_token_id, int) else self.eos_token_id
        return [int(i) for i in ids]
