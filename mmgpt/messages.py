"""Chat messages as HF and OpenAI write them, turned into what the chat template renders plus the images.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": ...}``; content is a string or a
list of parts: ``{"type": "text", "text": str}`` and ``{"type": "image", "image": PIL image | path | (3, H, W)
tensor}`` (HF processors' names; ``"url"`` or ``"path"`` may hold a local path instead of ``"image"``). Images may
come in any user or system turn, several per turn. ``parse_messages`` gives the template's plain messages, with one
``<image>`` marker where each image was, and the images in the order their markers appear.

Only images become markers: ``<image>`` written in a message's text is refused in user and system turns (there it
would be read as an image slot; ``mmgpt.prompts`` explains) and is text in assistant turns, like every other
special-token string. URLs are not fetched here: a caller that takes them (``mmgpt serve``) decodes them first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmgpt.prompts import IMAGE, check_text

ROLES = ("system", "user", "assistant")


def _image_of(part: Mapping[str, Any], where: str) -> Any:
    for key in ("image", "path", "url"):
        if key in part and part[key] is not None:
            value = part[key]
            if key != "image" and not isinstance(value, (str, Path)):
                raise TypeError(f"{where}[{key!r}] must be a local path, got {type(value).__name__}")
            if isinstance(value, str) and "://" in value:
                raise ValueError(
                    f"{where}[{key!r}] is a URL ({value:.60}); mmgpt reads local files and in-memory images only: "
                    "download or decode it first and pass the PIL image"
                )
            return value
    raise ValueError(f"{where} is an image part without an image: give it 'image' (PIL image, path or tensor)")


def _check_user_text(text: str, where: str) -> None:
    if IMAGE in text:
        raise ValueError(
            f"{where} holds {IMAGE!r}, the marker of an image's place; attach images as "
            f'{{"type": "image", "image": ...}} parts and their markers are added where the parts are'
        )


def parse_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, str]], list[Any]]:
    """Check a conversation and split it into template messages and images.

    Args:
        messages: ``[{"role": ..., "content": str | [part, ...]}, ...]`` (see the module docstring).

    Returns:
        ``(template_messages, images)``: ``[{"role": str, "content": str}]`` with an ``<image>`` marker per image,
        and the images (PIL images, paths or tensors, as given) in marker order.

    Raises:
        TypeError, ValueError: naming the message and part (``messages[2].content[1]``): not a list of dicts, an
            unknown role or part type, text that is not a string or not valid Unicode, ``<image>`` in a user or
            system turn's text, an image in an assistant turn, a URL, an empty conversation.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one user message")
    out: list[dict[str, str]] = []
    images: list[Any] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise TypeError(f"{where} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r:.40}")
        content = m.get("content")
        if isinstance(content, str):
            check_text(content, f"{where}.content")
            if role != "assistant":
                _check_user_text(content, f"{where}.content")
            out.append({"role": role, "content": content})
            continue
        if content is None or isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence):
            raise TypeError(
                f"{where}.content must be a string or a list of parts ({{'type': 'text'|'image', ...}}), "
                f"got {type(content).__name__}"
            )
        text = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            if not isinstance(part, Mapping):
                raise TypeError(f"{pwhere} must be a dict with a 'type', got {type(part).__name__}")
            kind = part.get("type")
            if kind == "text":
                check_text(part.get("text"), f"{pwhere}.text")
                if role != "assistant":
                    _check_user_text(part["text"], f"{pwhere}.text")
                text.append(part["text"])
            elif kind == "image":
                if role == "assistant":
                    raise ValueError(f"{pwhere}: an assistant turn cannot hold an image (the model writes text)")
                images.append(_image_of(part, pwhere))
                text.append(IMAGE)
            else:
                raise ValueError(f"{pwhere}.type must be 'text' or 'image', got {kind!r:.40}")
        out.append({"role": role, "content": "".join(text)})
    if out[-1]["role"] == "assistant":
        raise ValueError(
            f"messages[{len(out) - 1}] is the assistant's: the last message must be the user's (or the system's), "
            "the turn the model answers"
        )
    return out, images


def image_places(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where each image of a conversation that ``parse_messages`` accepted sits (``messages[2].content[0]``), in the
    order of its images: for errors about an image found later (a file that cannot be read)."""
    return [
        f"messages[{i}].content[{j}]"
        for i, m in enumerate(messages) if not isinstance(m["content"], str)
        for j, part in enumerate(m["content"]) if part["type"] == "image"
    ]
