"""Prompt templates for the three tasks, shared by training, evaluation and generation.

Every sequence is ``<bos> [<image> x N] <|user|> prompt <|assistant|> target <eos>``. Keeping one template for
captioning, VQA and text means the model tells the tasks apart by the user's words, as a chat model does,
and training and inference can never disagree on the format.
"""

from __future__ import annotations

import functools

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IMAGE = "<image>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE, USER, ASSISTANT, SYSTEM]

# The default instruction for captioning, used when the caller gives an image and no prompt.
CAPTION_PROMPT = "Describe the image."


def render_prompt(prompt: str | None, num_images: int = 0, image_seq_len: int = 0) -> str:
    """Render the part of a sequence the model is conditioned on (everything before the answer).

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


def conversation(prompt: str | None, target: str | None = None, num_images: int = 0) -> list[dict[str, str]]:
    """A single-turn exchange as chat messages: the user's turn (with one ``<image>`` marker per image) and,
    when ``target`` is given, the assistant's answer.

    Args:
        prompt: the user's text; ``None`` means the caption instruction (needs an image).
        target: the answer, or ``None`` for a prompt to generate from.
        num_images: images attached to the user's turn.
    """
    if prompt is None:
        if num_images == 0:
            raise ValueError("a text-only request needs a prompt; got prompt=None and no image")
        prompt = CAPTION_PROMPT
    messages = [{"role": "user", "content": IMAGE * num_images + prompt}]
    if target is not None:
        messages.append({"role": "assistant", "content": target})
    return messages


def encode_conversation(
    tokenizer, messages: list[dict[str, str]], image_seq_len: int, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """Render messages with the tokenizer's chat template and tokenize them, marking what the model must learn.

    Each ``<image>`` marker in a turn becomes ``image_seq_len`` placeholder tokens. The supervised tokens are
    exactly the assistant turns as the template writes them (their text and the template's end-of-turn
    marker), found by rendering the conversation up to each assistant turn with and without it: the template is
    the one used at inference, so training and generation can never disagree on the format.

    Args:
        tokenizer: a tokenizer with a chat template (``mmgpt.tokenizer.load_tokenizer`` gives one).
        messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
        image_seq_len: placeholder tokens per image.
        add_generation_prompt: end with the assistant tag, ready for generation.

    Returns:
        ``(ids, supervised, turns)``: token ids, a per-token flag for assistant tokens, and each assistant
        turn's ``[start, end)`` token span.
    """
    key = (tuple(tuple(m.items()) for m in messages), image_seq_len, add_generation_prompt)
    ids, supervised, turns = _encode_cached(tokenizer, *key)
    return list(ids), list(supervised), list(turns)


# Templated data repeats conversations over and over ("How many circles are there?" / "two"), and rendering a
# Jinja chat template costs more than drawing the image: remember recent ones. Keyed by the tokenizer object, so
# two tokenizers never share entries (the caller must not change a tokenizer's template after using it).
@functools.lru_cache(maxsize=16384)
def _encode_cached(
    tokenizer, messages: tuple[tuple[tuple[str, str], ...], ...], image_seq_len: int, add_generation_prompt: bool
) -> tuple[tuple[int, ...], tuple[bool, ...], tuple[tuple[int, int], ...]]:
    expanded = [dict(m) for m in messages]
    for m in expanded:
        m["content"] = m["content"].replace(IMAGE, IMAGE * image_seq_len)

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(expanded, add_generation_prompt)
    char_spans = []  # [start, end) characters of each assistant turn in `text`
    for i, m in enumerate(expanded):
        if m["role"] != "assistant":
            continue
        before = render(expanded[:i], True)
        # The last turn, without a generation prompt after it, ends the text already rendered: no third render.
        last = i == len(expanded) - 1 and not add_generation_prompt
        through = text if last else render(expanded[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                "the tokenizer's chat template renders a conversation differently from its own beginning "
                f"(turn {i}), so the assistant turns cannot be located; use a prefix-consistent template"
            )
        char_spans.append((len(before), len(through)))
    # The fast tokenizer's backend directly: the same ids and offsets at half the cost of the Python wrapper, which
    # matters because the training collator calls this for every sample.
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    supervised, turns = [False] * len(ids), []
    for start, end in char_spans:
        # A token belongs to the turn its first character is in.
        inside = [i for i, (a, b) in enumerate(offsets) if start <= a < end and b > a]
        for i in inside:
            supervised[i] = True
        turns.append((inside[0], inside[-1] + 1) if inside else (len(ids), len(ids)))
    return tuple(ids), tuple(supervised), tuple(turns)
