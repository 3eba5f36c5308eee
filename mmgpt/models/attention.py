"""Attention masks: the one place that decides which token sees which.

Training, evaluation and generation, on the native and the HF decoder alike, build their masks here, so the mask
a model is trained with is the mask it generates with.
"""

from __future__ import annotations

import torch


def build_attention_mask(
    key_valid: torch.Tensor, query_slots: torch.Tensor, prefix_end: torch.Tensor | int | None = None
) -> torch.Tensor:
    """The one place attention masks are made: causal over slots, padding keys hidden, optionally a prefix-LM.

    Training, evaluation and generation all call this, so the mask a model is trained with is the mask it
    generates with.

    Args:
        key_valid: ``(B, S)`` bool, False at padding slots.
        query_slots: ``(T,)`` the slots the queries sit in.
        prefix_end: ``None`` for plain causal attention. Otherwise the prefix-LM boundary (PaliGemma): an int
            or ``(B,)`` tensor of slots; every key before it is visible to every query, so the image and prompt
            attend to each other in both directions while the answer after it stays causal.

    Returns:
        ``(B, 1, T, S)`` bool, True = may attend. A padding query also attends to itself so that no row of the
        softmax is empty (an all-masked row gives NaN); its output is never used.
    """
    S = key_valid.size(1)
    slots = torch.arange(S, device=key_valid.device)
    visible = slots[None, :] <= query_slots[:, None]  # (T, S) causal
    if prefix_end is not None:
        prefix_end = torch.as_tensor(prefix_end, device=key_valid.device).reshape(-1, 1, 1)  # (B or 1, 1, 1)
        # Keys inside the prefix are visible to every query; keys after it stay causal, so no answer token is
        # ever visible to the prefix or to an earlier answer token.
        visible = visible[None] | (slots[None, None, :] < prefix_end)  # (B, T, S)
    self_slot = slots[None, :] == query_slots[:, None]  # (T, S)
    return ((visible & key_valid[:, None, :]) | self_slot).unsqueeze(1)


def default_position_ids(input_pos: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """``(B, T)`` RoPE positions when none are given: the cache slots being written, else ``0..T-1``."""
    positions = input_pos if input_pos is not None else torch.arange(T, device=device)
    return positions.unsqueeze(0).expand(B, T)


def build_packed_attention_mask(
    segment_ids: torch.Tensor, position_ids: torch.Tensor, prefix_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The mask of packed rows: several samples share a row, and each attends only within itself.

    A sample sits in consecutive slots of its row, so "causal over slots" is causal within the sample too;
    attention never crosses into a neighbour, so each sample's logits are those it would have alone (with
    ``position_ids`` restarting at 0 for every sample).

    Args:
        segment_ids: ``(B, T)`` the sample each slot holds (any id unique within the row), -1 at padding.
        position_ids: ``(B, T)`` each slot's position within its sample.
        prefix_lengths: ``None`` for plain causal attention; or, for a prefix-LM, ``(N,)`` each sample's prefix
            length indexed by its segment id: keys at positions before it are visible to the whole sample.

    Returns:
        ``(B, 1, T, T)`` bool, True = may attend; a padding query attends to itself only.
    """
    T = segment_ids.size(1)
    slots = torch.arange(T, device=segment_ids.device)
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] >= 0)  # (B, T, T)
    visible = (slots[None, :] <= slots[:, None])[None]  # (1, T, T) causal over slots
    if prefix_lengths is not None:
        key_prefix = prefix_lengths[segment_ids.clamp(min=0)]  # (B, T): the prefix length of each key's sample
        visible = visible | (position_ids < key_prefix)[:, None, :]  # (B, T, T)
    self_slot = (slots[None, :] == slots[:, None])[None]
    return ((same & visible) | self_slot).unsqueeze(1)
