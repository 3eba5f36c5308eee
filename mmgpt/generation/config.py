"""``GenerationConfig``: how to decode, in HF ``GenerationConfig``'s names and defaults where they overlap.

Torch-free, so a config can be built, printed and validated without the model. ``update`` is how keyword
arguments reach it: every ``generate``/``stream`` takes ``generation_config=`` plus any field as a keyword, and a
keyword that is no field is rejected by name. A config is validated when it is built, as HF's is, so a value that
cannot be decoded (``top_p=0``, ``temperature=nan``, ``max_new_tokens=2.5``) is an error naming the argument
before any model runs, never a crash deep inside sampling.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
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
            returned by ``Pipeline`` stops before it. A single string is one stop string, as in HF.
        use_cache: False re-runs the whole sequence every step (slow; the reference the KV cache is tested
            against).
        compile: ``torch.compile`` the decode step (mmgpt's, not an HF field). One graph serves every step and
            length; each batch size compiles once, and finished rows stay in the batch instead of leaving it.

    Raises:
        TypeError, ValueError: when built with a value of the wrong type or out of range, or settings that cannot
            go together (see ``validate``).
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

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            # HF's StopStringCriteria takes a bare string as one stop string; iterated as a sequence it would stop
            # at any of its characters.
            object.__setattr__(self, "stop_strings", [self.stop_strings])
        self.validate()

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
        """Raise ``TypeError`` for a value of the wrong type and ``ValueError`` for one out of range or settings
        that cannot be decoded together, naming the argument and its value. Called when a config is built.

        Ranges are HF's, and checked where a value is used, as HF's logits processors do: the sampling filters
        only when sampling (``temperature`` > 0, ``top_p`` in (0, 1], ``min_p`` in [0, 1]; greedy ignores them,
        so ``temperature=0`` with greedy is fine), ``length_penalty`` with beam search; always ``top_k`` an int
        >= 0 (0 or None: off) and ``repetition_penalty`` > 0.
        """
        _check_int("max_new_tokens", self.max_new_tokens, minimum=0)
        _check_int("num_return_sequences", self.num_return_sequences, minimum=1)
        _check_int("num_beams", self.num_beams, minimum=1)
        for name in ("do_sample", "use_cache", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty", "min_p"):
            _check_number(name, getattr(self, name), optional=name == "min_p")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, minimum=0)
        if self.do_sample:
            _check_range("temperature", self.temperature, 0, context=" when sampling (do_sample=True)")
            _check_range("top_p", self.top_p, 0, 1)
            if self.min_p is not None:
                _check_range("min_p", self.min_p, 0, 1, low_open=False)
        # HF's penalty divides positive logits by it: 0 divides by zero, and a negative one flips their sign.
        _check_range("repetition_penalty", self.repetition_penalty, 0)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        # Any int, as HF: a negative id is never generated (eos) or only fills the output (pad, a sentinel).
        eos = self.eos_token_id
        for i in [] if eos is None else eos if isinstance(eos, (list, tuple)) else [eos]:
            _check_int("eos_token_id", i, what="an int or a list of ints")
        if self.pad_token_id is not None:
            _check_int("pad_token_id", self.pad_token_id)
        if self.stop_strings is not None:
            stops = self.stop_strings
            message = f"stop_strings must be a list of non-empty strings, got {stops!r}"
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
                raise TypeError(message)
            if not all(stops):  # "" is in every text: every sequence would stop at its first token
                raise ValueError(message)
        if self.num_beams > 1:
            _check_range("length_penalty", self.length_penalty)
            if self.do_sample:
                raise ValueError("num_beams > 1 with do_sample=True (beam sampling) is not supported; choose one")
            if self.stop_strings:
                raise ValueError("stop_strings are not supported with beam search; use eos_token_id")
            if not self.use_cache:
                raise ValueError("beam search needs the KV cache (use_cache=True)")
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
        ids = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
        return [int(i) for i in ids]


def _check_int(name: str, value: Any, minimum: int | None = None, what: str = "an int") -> None:
    # bool is an int subclass, but max_new_tokens=True is a mistake, not 1.
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")


def _check_range(
    name: str, value: float, low: float | None = None, high: float | None = None, low_open: bool = True,
    context: str = "",
) -> None:
    """``value`` finite and in (``low``, ``high``] (``[low, high]`` when not ``low_open``); None: unbounded."""
    # NaN fails every comparison, so bounds alone would let it through to poison the logits.
    below = low is not None and (value <= low if low_open else value < low)
    if math.isfinite(value) and not below and (high is None or value <= high):
        return
    if low is None:
        expected = "a finite number"
    elif high is None:
        expected = f"> {low:g}"
    else:
        expected = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    raise ValueError(f"{name} must be {expected}{context}, got {value}")
