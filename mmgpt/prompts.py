"""Prompt templates for the three tasks, shared by training, evaluation and generation.

Every sequence is ``<bos> [<image> x N] <|user|> prompt <|assistant|> target <eos>``. Keeping one template for
captioning, VQA and text means the model tells the tasks apart by the user's words, as a chat model does,
and training and inference can never disagree on the format.

Only the chat template writes control tokens. Text from users and from data is always text: a ``"<|eos|>"`` or
``"<|assistant|>"`` typed into a prompt or found in a caption is tokenized as the characters it is made of, so it
can neither forge a turn at inference nor put a control token into the training labels. The one marker a message
may carry is ``<image>`` in a user (or system) turn, which is where that turn's image goes (LLaVA's convention).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IMAGE = "<image>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE, USER, ASSISTANT, SYSTEM]

# The default instruction for captioning, used when the caller gives an image and no prompt.
CAPTION_PROMPT = "Describe the image."


def render_prompt(prompt: str | None, num_images: int = 0, image_seq_len: int = 0) -> str:
    """Render the part of a sequence the model is conditioned on (everything before the answer).

    The prompt goes in as it is, so a special-token string in it would tokenize as the control token: for trusted
    text (tests, benchmarks). Users' and data text goes through ``conversation`` and ``encode_conversation``.

    Args:
        prompt: the user's text; ``None`` means the caption instruction (needs an image).
        num_images: how many images precede the text.
        image_seq_len: tokens per image after the projector (placeholders per image).

    Returns:
        The prompt string, ending with the assistant tag so generation continues with the answer.
    """
    if prompt is None:
        if num_images == 0:
            raise ValueError("a text-only request needs a prompt; got prompt=None and no image")
        prompt = CAPTION_PROMPT
    return BOS + IMAGE * (num_images * image_seq_len) + USER + prompt + ASSISTANT


def render_target(target: str) -> str:
    """The supervised continuation: the answer and the end-of-sequence token that stops generation."""
    return target + EOS


def check_text(text: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``text`` is a ``str``, and ``ValueError`` if it cannot be encoded as UTF-8 (a lone
    surrogate such as ``"\\ud800"``, which JSON allows and tokenizers refuse with an unhelpful ``TypeError``)."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}: {text!r:.80}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} is not valid Unicode text: {e.reason} {text[e.start]!r} at index {e.start} of {text!r:.80}"
        ) from None


def conversation(prompt: str | None, target: str | None = None, num_images: int = 0) -> list[dict[str, str]]:
    """A single-turn exchange as chat messages: the user's turn (with one ``<image>`` marker per image) and,
    when ``target`` is given, the assistant's answer.

    Args:
        prompt: the user's text; ``None`` means the caption instruction (needs an image). It may not hold
            ``<image>``: images are passed beside the text, and this adds their markers.
        target: the answer, or ``None`` for a prompt to generate from. Any text, ``<image>`` included.
        num_images: images attached to the user's turn.

    Raises:
        TypeError: ``prompt`` or ``target`` is not a string (or None).
        ValueError: a text-only request without a prompt, text that is not valid Unicode, or ``<image>`` in the
            prompt.
    """
    if prompt is not None:
        check_text(prompt, "prompt")
        if IMAGE in prompt:
            # In a user turn "<image>" *is* the image's slot (the convention of the training data), so it cannot
            # also stand for the characters: kept, it would ask for an image that was never given, or silently
            # take one meant for another slot. An error says where images go instead.
            raise ValueError(
                f"prompt {prompt!r:.80} holds {IMAGE!r}, the marker of an image's place; pass images beside the "
                f"text (generate(images, prompts)) and their markers are added, one per image"
            )
    if target is not None:
        check_text(target, "target")
    if prompt is None:
        if num_images == 0:
            raise ValueError("a text-only request needs a prompt; got prompt=None and no image")
        prompt = CAPTION_PROMPT
    messages = [{"role": "user", "content": IMAGE * num_images + prompt}]
    if target is not None:
        messages.append({"role": "assistant", "content": target})
    return messages


def content_parts(content: str) -> list[dict[str, str]]:
    """A message's ``<image>``-marked text as HF's list of parts, for chat templates that read content that way
    (SmolVLM's, and other processors' templates): an ``{"type": "image"}`` part per marker, the text around them in
    ``{"type": "text"}`` parts."""
    parts: list[dict[str, str]] = []
    for k, text in enumerate(content.split(IMAGE)):
        if k:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts or [{"type": "text", "text": ""}]


@functools.lru_cache(maxsize=16)
def reads_content_parts(tokenizer) -> bool:
    """Whether the tokenizer's chat template reads message content as a list of parts only: it drops (or refuses)
    a plain string. Keyed by the tokenizer object, as ``_special_strings``."""
    probe = "\U000f0000"  # a private-use character no template writes of its own accord
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
    except Exception:  # a template that indexes into content as a list, under StrictUndefined
        return True
    return probe not in rendered


def encode_conversation(
    tokenizer, messages: list[dict[str, str]], image_seq_len: int, add_generation_prompt: bool = False,
    image_texts: Sequence[str] | None = None, locate_turns: bool = True,
) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """Render messages with the tokenizer's chat template and tokenize them, marking what the model must learn.

    Each ``<image>`` marker in a user or system turn becomes ``image_seq_len`` placeholder tokens. Every other
    special-token string in a message (``<|eos|>``, ``<|im_start|>``, and ``<image>`` in an assistant turn, since
    a model writes no images) is text: it is tokenized as its characters, as HF's ``split_special_tokens=True``
    does, and only the template's own markers become control tokens. Text without such strings gets exactly the
    ids of tokenizing the rendered conversation in one piece.

    The supervised tokens are exactly the assistant turns as the template writes them (their text and the
    template's end-of-turn marker), found by rendering the conversation up to each assistant turn with and
    without it: the template is the one used at inference, so training and generation can never disagree on the
    format.

    Args:
        tokenizer: a tokenizer with a chat template (``mmgpt.tokenizer.load_tokenizer`` gives one).
        messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
        image_seq_len: placeholder tokens per image.
        add_generation_prompt: end with the assistant tag, ready for generation.
        image_texts: what each ``<image>`` marker becomes, in order (a tiled picture's text,
            ``mmgpt.models.image_tiling.image_prompt``); None: ``image_seq_len`` placeholders each. The markers
            are replaced in the rendered text, as HF processors do, so a template that reads content as parts
            (``reads_content_parts``) sees an image part where each marker is.
        locate_turns: find the assistant turns (training's labels). False for a prompt to generate from, which
            needs only the ids: then a template that renders an assistant turn unlike its generation prompt (one
            that writes ``<|im_start|>assistant `` before a turn's text but ``<|im_start|>assistant\n`` as the
            generation prompt) still renders a multi-turn conversation, exactly as HF's ``apply_chat_template``
            does; no turn is marked.

    Returns:
        ``(ids, supervised, turns)``: token ids, a per-token flag for assistant tokens, and each assistant
        turn's ``[start, end)`` token span.

    Raises:
        TypeError, ValueError: a message that is not ``{"role": str, "content": str}``, or content that is not
            valid Unicode.
    """
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TypeError(f"messages[{i}] must be a dict with a 'role' and a 'content' string, got {m!r:.80}")
        check_text(m.get("content"), f"messages[{i}] ({m['role']}) content")
    key = (
        tuple(tuple(m.items()) for m in messages), image_seq_len, add_generation_prompt,
        None if image_texts is None else tuple(image_texts), locate_turns,
    )
    ids, supervised, turns = _encode_cached(tokenizer, *key)
    return list(ids), list(supervised), list(turns)


# Templated data repeats conversations over and over ("How many circles are there?" / "two"), and rendering a
# Jinja chat template costs more than drawing the image: remember recent ones. Keyed by the tokenizer object, so
# two tokenizers never share entries (the caller must not change a tokenizer's template after using it).
@functools.lru_cache(maxsize=16384)
def _encode_cached(
    tokenizer, messages: tuple[tuple[tuple[str, str], ...], ...], image_seq_len: int, add_generation_prompt: bool,
    image_texts: tuple[str, ...] | None = None, locate_turns: bool = True,
) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[tuple[int, int], ...]]:
    expanded = [dict(m) for m in messages]
    # Special-token strings in the content stand in as same-length runs of private-use characters while the
    # template renders, so the only special tokens in `text` are the template's, and every position is that of
    # the real text. Ordinary content is left as it is.
    originals = _escape_special_strings(tokenizer, expanded)
    parts = reads_content_parts(tokenizer)
    if image_texts is None and not parts:
        for m in expanded:
            m["content"] = m["content"].replace(IMAGE, IMAGE * image_seq_len)  # markers only: the rest is escaped

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        if parts:
            msgs = [{**m, "content": content_parts(m["content"])} for m in msgs]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        if image_texts is None and not parts:
            return text
        # The k-th marker of the rendered text is the k-th image (every other "<image>" is escaped); a rendering
        # of the first turns holds the first markers.
        pieces = text.split(IMAGE)
        fills = image_texts if image_texts is not None else [IMAGE * image_seq_len] * (len(pieces) - 1)
        if len(pieces) - 1 > len(fills):
            raise ValueError(f"the conversation holds {len(pieces) - 1} {IMAGE} markers for {len(fills)} images")
        return pieces[0] + "".join(f + p for f, p in zip(fills, pieces[1:], strict=False))

    text = render(expanded, add_generation_prompt)
    if image_texts is not None and text.count(IMAGE) != sum(t.count(IMAGE) for t in image_texts):
        raise ValueError(f"the conversation's {IMAGE} markers do not match its {len(image_texts)} images")
    char_spans = []  # [start, end) characters of each assistant turn in `text`
    spliced, done = "", ""  # the text built turn by turn, and the template's rendering of the turns in it
    for i, m in enumerate(expanded):
        if m["role"] != "assistant" or not locate_turns:
            continue
        before = render(expanded[:i], True)
        # The last turn, without a generation prompt after it, ends the text already rendered: no third render.
        last = i == len(expanded) - 1 and not add_generation_prompt
        through = text if last else render(expanded[: i + 1], False)
        answer = through[len(before):] if through.startswith(before) else _after_generation_prompt(
            render, expanded, i, before, through
        )
        if answer is None or not before.startswith(done):
            raise ValueError(
                "the tokenizer's chat template renders a conversation differently from its own beginning "
                f"(turn {i}), so the assistant turns cannot be located; use a prefix-consistent template"
            )
        spliced += before[len(done):]
        char_spans.append((len(spliced), len(spliced) + len(answer)))
        spliced, done = spliced + answer, through
    if char_spans:
        if not text.startswith(done):
            raise ValueError(
                "the tokenizer's chat template renders a conversation differently from its own beginning, so the "
                "assistant turns cannot be located; use a prefix-consistent template"
            )
        # Equal to `text` for a prefix-consistent template; otherwise each answer follows the generation prompt.
        text = spliced + text[len(done):]
    # The fast tokenizer's backend directly: the same ids and offsets at half the cost of the Python wrapper, which
    # matters because the training collator calls this for every sample.
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    if originals:
        ids, offsets = _content_as_text(tokenizer, text, originals, ids, offsets)
    supervised, turns = [False] * len(ids), []
    for start, end in char_spans:
        # A token belongs to the turn its first character is in.
        inside = [i for i, (a, b) in enumerate(offsets) if start <= a < end and b > a]
        for i in inside:
            supervised[i] = True
        turns.append((inside[0], inside[-1] + 1) if inside else (len(ids), len(ids)))
    return tuple(ids), tuple(supervised), tuple(turns)


def _after_generation_prompt(render, messages: list[dict], i: int, before: str, through: str) -> str | None:
    """Assistant turn ``i`` as the text that follows the generation prompt, for a template whose turns begin unlike
    its generation prompt by whitespace alone (LLaVA-OneVision's writes ``<|im_start|>assistant \n`` + text before
    a turn's text, and ``<|im_start|>assistant\n`` as the prompt to answer): the turn without its header and the
    whitespace after it, so that training answers in the context generation does. None for any other difference."""
    history = render(messages[:i], False)
    if not (before.startswith(history) and through.startswith(history)):
        return None
    prompt, turn = before[len(history):], through[len(history):]
    header = prompt.rstrip()
    rest = turn[len(header):]
    if not header or not turn.startswith(header) or not rest[:1].isspace():
        return None
    return rest.lstrip()


@functools.lru_cache(maxsize=16)
def _special_strings(tokenizer) -> re.Pattern | None:
    """A pattern matching the tokenizer's special tokens (the added tokens its backend splits text at), longest
    first, as the backend matches them; None if it has none."""
    strings = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None


@functools.lru_cache(maxsize=16)
def _text_only_backend(tokenizer) -> Tokenizer:
    """A copy of the tokenizer's backend that reads special-token strings as text (what HF's
    ``split_special_tokens=True`` sets). A copy, because that switch on the shared backend would change it for
    every other thread tokenizing at the same time."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    return backend


def _escape_special_strings(tokenizer, messages: list[dict[str, str]]) -> dict[str, str]:
    """Replace, in place, each special-token string in the messages' content (but ``<image>`` in a user or system
    turn, the image marker) by a run of one private-use character as long as the string.

    Returns:
        ``{run: original string}`` for the replacements made; empty for ordinary content (nothing replaced).
    """
    pattern = _special_strings(tokenizer)
    if pattern is None:
        return {}

    def forged(m: dict[str, str]) -> bool:
        return any(s.group() != IMAGE or m["role"] == "assistant" for s in pattern.finditer(m["content"]))

    if not any(forged(m) for m in messages):
        return {}
    # One character per special string, from the supplementary private-use planes, skipping any the content
    # itself uses, so a run can only be a replacement.
    used = {c for m in messages for c in m["content"]}
    chars = (chr(c) for c in range(0xF0000, 0x10FFFE) if chr(c) not in used)
    runs: dict[str, str] = {}
    for m in messages:
        def escape(s: re.Match, role: str = m["role"]) -> str:
            if s.group() == IMAGE and role != "assistant":
                return s.group()
            if s.group() not in runs:
                runs[s.group()] = next(chars) * len(s.group())
            return runs[s.group()]

        m["content"] = pattern.sub(escape, m["content"])
    return {run: original for original, run in runs.items()}


def _content_as_text(
    tokenizer, text: str, originals: dict[str, str], ids: list[int], offsets: list[tuple[int, int]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """The tokens of the rendered conversation with its escaped runs restored as text.

    The backend splits text at special tokens and tokenizes each stretch between two of them on its own, so
    ``ids`` (of ``text``, whose only special tokens are the template's) is kept except in the stretches that hold
    an escaped run: those are tokenized again, restored, by the backend that reads special-token strings as text.
    Offsets stay valid because every run is as long as the string it stands for.
    """
    restored = text
    for run, original in originals.items():
        restored = restored.replace(run, original)
    marks = re.compile("[" + "".join(re.escape(run[0]) for run in originals) + "]")
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    start, first = 0, 0  # the current stretch: its first character and its first token

    def stretch(end: int, last: int) -> None:
        if marks.search(text, start, end):
            enc = _text_only_backend(tokenizer).encode(restored[start:end], add_special_tokens=False)
            out_ids.extend(enc.ids)
            out_offsets.extend((a + start, b + start) for a, b in enc.offsets)
        else:
            out_ids.extend(ids[first:last])
            out_offsets.extend(offsets[first:last])

    for k, (i, (a, b)) in enumerate(zip(ids, offsets, strict=True)):
        if i in special:
            stretch(a, k)
            out_ids.append(i)
            out_offsets.append((a, b))
            start, first = b, k + 1
    stretch(len(text), len(ids))
    return out_ids, out_offsets
