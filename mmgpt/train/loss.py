"""The training loss: next-token cross-entropy on the supervised tokens, weighted per token or per sample.

Evaluation's teacher forcing (``mmgpt.eval.evaluate.teacher_forced``) scores reference answers with the same
targets, so a validation perplexity and the training loss count exactly the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmgpt.data.collate import IGNORE_INDEX

LOSS_WEIGHTINGS = ("token", "sample")


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a ``(B, T)`` batch's loss is: ``is_target`` ``(B, T-1)``, True where position t's next token is
    supervised, and the same positions as flat indices into ``B * T`` for ``MMGPT.forward(logits_at=...)``, which
    then computes logits there only (``(K, vocab)``, row-major, in the order of ``labels[:, 1:][is_target]``)."""
    is_target = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
    # Computed eagerly (a data-dependent shape), so that a compiled forward can take it.
    logits_at = F.pad(is_target, (0, 1)).flatten().nonzero().squeeze(1)  # (K,)
    return is_target, logits_at


def summed_next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, is_target: torch.Tensor, per: str = "token",
    segment_ids: torch.Tensor | None = None, num_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over the units of ``per``, and how many units there are.

    Args:
        logits: ``(K, V)`` at the K target positions (``next_token_targets``), row-major.
        labels: ``(B, T)`` the batch's labels (not shifted).
        is_target: ``(B, T-1)`` from ``next_token_targets(labels)``.
        per: ``"token"``: the sum over supervised tokens and their count. ``"sample"``: each sample's mean over
            its supervised tokens, summed over samples, and the number of samples with any: every sample weighs
            the same, however long its answer.
        segment_ids: ``(B, T)`` for packed rows (several samples a row), with ``num_samples`` samples in all.
    """
    if per not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting {per!r}; expected one of {list(LOSS_WEIGHTINGS)}")
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    token_loss = F.cross_entropy(logits.float(), targets[is_target], reduction="none")  # (K,)
    if per == "token":
        return token_loss.sum(), torch.tensor(token_loss.numel(), device=token_loss.device)
    # Each target token's sample: its row unpacked, its segment when packed (several per row).
    if segment_ids is not None:
        n, owner = num_samples, segment_ids[:, 1:]
    else:
        n = targets.size(0)
        owner = torch.arange(n, device=labels.device)[:, None]
    owner = owner.expand_as(targets)[is_target]  # (K,)
    sums = token_loss.new_zeros(n).index_add_(0, owner, token_loss)  # (n,)
    counts = torch.zeros(n, dtype=torch.long, device=labels.device).index_add_(0, owner, torch.ones_like(owner))
    return (sums / counts.clamp(min=1)).sum(), (counts > 0).sum()
