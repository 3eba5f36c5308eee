"""Turns a list of ``Sample`` into tensors: token ids, labels, attention mask and stacked images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import PreTrainedTokenizerFast

from mmgpt.data.sample import Sample
from mmgpt.models.anyres import AnyresImage, AnyresImageProcessor
from mmgpt.models.image_processor import ImageProcessor
from mmgpt.models.image_tiling import TiledImage, TilingImageProcessor, image_prompt
from mmgpt.prompts import IMAGE, encode_conversation

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: image, prompt and padding positions


class Collator:
    """Tokenize and pad a batch.

    Rows are the sample's conversation rendered by the tokenizer's chat template (``encode_conversation``). In
    ``"train"`` mode a row is the whole conversation, right-padded, with ``labels`` equal to the ids on the
    assistant turns (answer + end-of-turn) and ``IGNORE_INDEX`` elsewhere (labels are *not* shifted; the loss
    shifts), and ``prefix_lengths`` the length before the first answer (images included), which a prefix-LM
    reads bidirectionally. A turn that truncation would leave with no supervised token is an error. In
    ``"generate"`` mode a row is the prompt alone, left-padded, so that generation continues every row from the
    same slot.

    A tiling processor (``TilingImageProcessor``, Idefics3/SmolVLM's) makes a picture ``rows * cols + 1`` images (the
    tiles and the global view) and its ``<image>`` marker the text the HF processor writes for them
    (``image_tiling.image_prompt``), so a batch holds as many images as its pictures have tiles.

    An anyres processor (``AnyresImageProcessor``, LLaVA-OneVision's) makes a picture an ``AnyresImage``, its prompt's
    only picture and so cut into tiles, and its ``<image>`` marker as many placeholders as the model packs it into
    (``AnyresImageProcessor.num_tokens``, ``LlavaOnevisionProcessor``'s count); ``batch["images"]`` is then an
    ``AnyresImages`` list, which the model takes as it is.

    With ``pack=True`` (training only) the samples are packed into as few rows of at most ``max_length`` tokens
    as fit (first-fit by decreasing length) instead of one row each: no slot is spent on padding between a long
    caption and a one-word answer, and tasks stay mixed in every batch. The batch then also carries
    ``position_ids`` (restarting at 0 for every sample) and ``segment_ids`` (the sample each slot holds, -1 at
    padding), which keep every sample's attention and logits exactly what they are unpacked; ``ids``,
    ``tasks`` and ``prefix_lengths`` stay in sample order and ``images`` in the order the rows hold them.

    Args:
        tokenizer: the model's tokenizer.
        processor: turns each image into a ``(3, H, W)`` tensor, or (tiling) into a ``TiledImage``, or (anyres, the
            model's own processor) into an ``AnyresImage``.
        image_seq_len: ``<image>`` placeholders per image (``image_seq_len_for(model)``: the model's
            ``image_seq_len``, or 0 for an anyres model, whose processor counts each picture's).
        max_length: longest row in tokens; longer rows are truncated on the right.
        mode: ``"train"`` or ``"generate"``.
        pack: pack several samples per row (``"train"`` mode only).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        processor: ImageProcessor | TilingImageProcessor | AnyresImageProcessor,
        image_seq_len: int,
        max_length: int = 256,
        mode: Literal["train", "generate"] = "train",
        pack: bool = False,
    ) -> None:
        if pack and mode != "train":
            raise ValueError(f"Collator: pack=True is for training rows; mode={mode!r} builds prompts to generate from")
        self.tokenizer, self.processor = tokenizer, processor
        self.image_seq_len, self.max_length, self.mode, self.pack = image_seq_len, max_length, mode, pack
        self.pad_id = tokenizer.pad_token_id

    def _pixels(self, s: Sample) -> tuple[torch.Tensor | AnyresImages | None, list[str] | None]:
        """The sample's images ``(n, 3, H, W)`` (an anyres processor: its one ``AnyresImage`` in a list; None without
        a picture), and, for a tiling or anyres processor, the text its ``<image>`` marker becomes (None:
        ``image_seq_len`` placeholders)."""
        if s.image is None:
            return None, None
        out = self.processor(s.image)
        if isinstance(out, TiledImage):
            return out.pixels, [image_prompt(out.rows, out.cols, self.image_seq_len)]
        if isinstance(out, AnyresImage):
            # A sample has one picture, so it is split into tiles (LlavaOnevisionProcessor splits a prompt's only
            # picture), and takes as many placeholders as its size makes.
            return AnyresImages([out]), [IMAGE * self.processor.num_tokens(out)]
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"sample {s.id!r}: the model's image processor gives a {type(out).__name__}; training and evaluation "
                f"batches take one (3, H, W) image per picture, Idefics3/SmolVLM tiles (a TiledImage), or "
                f"LLaVA-OneVision's tiles (an AnyresImage)"
            )
        return out[None], None

    def _row(self, s: Sample, image_texts: list[str] | None = None) -> tuple[list[int], list[int]]:
        try:
            ids, supervised, turns = encode_conversation(
                self.tokenizer, s.conversation(with_answer=self.mode == "train"), self.image_seq_len,
                add_generation_prompt=self.mode == "generate", image_texts=image_texts,
            )
        except (ValueError, TypeError) as e:
            # Name the sample: a batch holds many, and the message alone does not say which one is bad.
            if type(e) in (ValueError, TypeError):
                raise type(e)(f"sample {s.id!r}: {e}") from e
            raise  # a subclass may need other constructor arguments: re-raised as it is
        if self.mode == "generate":
            if len(ids) > self.max_length:
                raise ValueError(
                    f"sample {s.id!r}: the prompt alone is {len(ids)} tokens (images included), more than "
                    f"max_length={self.max_length}; raise data.max_length or shorten it"
                )
            return ids, []
        if not turns:
            raise ValueError(f"sample {s.id!r} has no assistant turn: there is nothing to learn from it")
        if turns[0][0] >= self.max_length:
            raise ValueError(
                f"sample {s.id!r}: the prompt alone is {turns[0][0]} tokens (images included), which leaves no "
                f"room for an answer within max_length={self.max_length}; raise data.max_length or shorten it"
            )
        for k, (start, end) in enumerate(turns):
            # Position 0 is never predicted (the loss shifts), so a turn needs a token in [1, max_length).
            if start >= self.max_length or end <= 1:
                raise ValueError(
                    f"sample {s.id!r}: assistant turn {k + 1} of {len(turns)} (tokens {start}..{end}) loses all its "
                    f"supervised tokens to truncation at max_length={self.max_length}; it would train on a zero "
                    f"loss for that turn. Raise data.max_length or split the conversation"
                )
        ids = ids[: self.max_length]
        labels = [t if sup else IGNORE_INDEX for t, sup in zip(ids, supervised, strict=False)]
        return ids, labels

    def __call__(self, samples: Sequence[Sample]) -> dict:
        images = [self._pixels(s) for s in samples]
        rows = [self._row(s, texts) for s, (_, texts) in zip(samples, images, strict=True)]
        pixels = [p for p, _ in images]
        if self.pack:
            return self._packed(samples, rows, pixels)
        # Training pads on the right (causal attention never looks ahead into it); generation on the left.
        side = "right" if self.mode == "train" else "left"
        input_ids, attention_mask = pad_rows([ids for ids, _ in rows], self.pad_id, side)
        batch = {
            "input_ids": input_ids,  # (B, T)
            "attention_mask": attention_mask,  # (B, T)
            # (N, 3, H, W): one per image (per tile with tiling), in row order; anyres: an AnyresImages list
            "images": _join_images([p for p in pixels if p is not None]),
            "ids": [s.id for s in samples],
            "tasks": [s.task for s in samples],
        }
        if self.mode == "train":
            batch["labels"] = pad_rows([lab for _, lab in rows], IGNORE_INDEX, side)[0]  # (B, T)
            # The prompt of every row starts at slot 0 and ends here: the prefix of decoder.attention="prefix".
            # Everything before the first answer token; with several turns, later user turns stay causal.
            batch["prefix_lengths"] = _prefix_lengths(rows)  # (B,)
        else:
            batch["answers"] = [s.answers for s in samples]
            batch["qtypes"] = [s.qtype for s in samples]
            batch["prompts"] = [s.prompt for s in samples]
        return batch

    def _packed(
        self, samples: Sequence[Sample], rows: list[tuple[list[int], list[int]]],
        sample_pixels: list[torch.Tensor | AnyresImages | None],
    ) -> dict:
        # First-fit decreasing: long captions open rows, short answers fill their tails. Deterministic.
        bins: list[list[int]] = []  # sample indices per packed row, in slot order
        room: list[int] = []
        for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
            n = len(rows[i][0])
            r = next((r for r, free in enumerate(room) if free >= n), None)
            if r is None:
                r = len(bins)
                bins.append([])
                room.append(self.max_length)
            bins[r].append(i)
            room[r] -= n
        T = max(self.max_length - free for free in room)
        # Rows are built as Python lists and become tensors once: per-sample tensor copies cost more than the rest.
        # pixels: (n, 3, H, W) each, or an AnyresImages list of one
        input_ids, labels, position_ids, segment_ids, pixels = [], [], [], [], []
        for members in bins:
            ids_row, lab_row, pos_row, seg_row = [], [], [], []
            for i in members:
                ids, lab = rows[i]
                ids_row += ids
                # The loss shifts within the row: the slot before a sample's first token belongs to its
                # neighbour, so that first token is never a target (it never is unpacked either).
                lab_row += [IGNORE_INDEX, *lab[1:]]
                pos_row += range(len(ids))
                seg_row += [i] * len(ids)
                if sample_pixels[i] is not None:
                    pixels.append(sample_pixels[i])  # row-major: the order the splice fills
            pad = T - len(ids_row)
            input_ids.append(ids_row + [self.pad_id] * pad)
            labels.append(lab_row + [IGNORE_INDEX] * pad)
            position_ids.append(pos_row + [0] * pad)
            segment_ids.append(seg_row + [-1] * pad)
        segment_ids = torch.tensor(segment_ids)
        return {
            "input_ids": torch.tensor(input_ids),  # (R, T): R packed rows
            "attention_mask": (segment_ids >= 0).long(),  # (R, T)
            "labels": torch.tensor(labels),  # (R, T)
            "position_ids": torch.tensor(position_ids),  # (R, T): restarts at 0 for every sample
            "segment_ids": segment_ids,  # (R, T): index of the sample in ``ids``, -1 at padding
            "images": _join_images(pixels),  # (N, 3, H, W) in slot order; anyres: an AnyresImages list
            "ids": [s.id for s in samples],
            "tasks": [s.task for s in samples],
            "prefix_lengths": _prefix_lengths(rows),  # (len(samples),) in sample order
        }


class AnyresImages(list):
    """A batch's pictures for an anyres model (LLaVA-OneVision): ``AnyresImage``s in the order their placeholders
    appear, which ``MMGPT`` takes as its ``images``. A list with a ``to``, so that it moves to a device as a batch's
    tensors do (Lightning moves every value that has one; evaluation calls it)."""

    def to(self, *args, **kwargs) -> AnyresImages:
        return AnyresImages(image.to(*args, **kwargs) for image in self)


def _join_images(pixels: list) -> torch.Tensor | AnyresImages | None:
    """The samples' images as one batch value: ``(N, 3, H, W)`` in order, an ``AnyresImages`` list, or None."""
    if not pixels:
        return None
    if isinstance(pixels[0], AnyresImages):
        return AnyresImages(image for images in pixels for image in images)
    return torch.cat(pixels)


def image_seq_len_for(model) -> int:
    """The ``image_seq_len`` a ``Collator`` for ``model`` takes: the model's, or 0 for an anyres model (vision.anyres,
    LLaVA-OneVision), which has no one count: its processor counts each picture's placeholders."""
    return 0 if isinstance(model.processor, AnyresImageProcessor) else model.image_seq_len


def _prefix_lengths(rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    # Each row's tokens before its first supervised one: the image and prompt, the prefix of a prefix-LM.
    return torch.tensor([next(i for i, t in enumerate(lab) if t != IGNORE_INDEX) for _, lab in rows])


def pad_rows(rows: Sequence[list[int]], pad_value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> ``(ids, attention_mask)``, both ``(B, T)`` long, 1 on real tokens.

    ``side="left"`` is how generation pads: every row's last token then sits in the same slot, so one decode step
    serves all rows.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}; expected 'left' or 'right'")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, sl], mask[i, sl] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask
