"""Prompt templates for the three tasks, shared by training, evaluation and generation.

Every sequence is ``<bos> [<image> x N] <|user|> prompt <|assistant|> target <eos>``. Keeping one template for
captioning, VQA and text means the model tells the tasks apart by the user's words, as a chat model does,
and training and inference can never disagree on the format.
"""

from __future__ import annotations

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
