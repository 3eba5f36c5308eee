"""Refusing weights that hold NaN or inf: a diverged run's weights must never be saved, exported or loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# How many offending tensors an error names before summing up the rest.
_NAMED = 8


def nonfinite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold a NaN or an infinity."""
    return [
        name for name, t in state_dict.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def check_finite(state_dict: Mapping[str, Any], where: str) -> None:
    """Raise a ValueError naming the tensors of ``state_dict`` that are not finite (``where``: what they are)."""
    if bad := nonfinite_tensors(state_dict):
        shown = ", ".join(bad[:_NAMED]) + (f" and {len(bad) - _NAMED} more" if len(bad) > _NAMED else "")
        raise ValueError(
            f"{where}: {len(bad)} of {len(state_dict)} weight tensors hold NaN or inf ({shown}); a diverged "
            f"training run leaves such weights: restart from an earlier checkpoint with a lower learning rate"
        )
