"""The check that a half-precision setting is not silently tens of times slower on this CPU."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from conftest import tiny_data

import mmgpt.train.precision
from mmgpt.train.precision import cpu_has_fast_matmul, slow_cpu_precision_warning


def test_full_precision_never_warns(monkeypatch):
    monkeypatch.setattr(mmgpt.train.precision, "cpu_has_fast_matmul", lambda dtype: False)
    assert cpu_has_fast_matmul(torch.float32) and cpu_has_fast_matmul(torch.float64)
    for precision in ("32-true", "32", "64-true", 32):
        assert slow_cpu_precision_warning(precision) is None


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", "bfloat16"), ("bf16-true", "bfloat16"),
                                              ("16-mixed", "float16")])
def test_half_precision_warns_only_without_fast_kernels(monkeypatch, precision, dtype):
    asked = []
    monkeypatch.setattr(mmgpt.train.precision, "cpu_has_fast_matmul", lambda d: asked.append(d) or False)
    message = slow_cpu_precision_warning(precision)
    assert asked == [getattr(torch, dtype)]
    assert f"trainer.precision={precision}" in message and dtype in message and "32-true" in message
    monkeypatch.setattr(mmgpt.train.precision, "cpu_has_fast_matmul", lambda d: True)
    assert slow_cpu_precision_warning(precision) is None


def fit_one_step(m, tmp_path, precision: str) -> list[str]:
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(m, datamodule=tiny_data(m))
    return [str(w.message) for w in caught if "trainer.precision=" in str(w.message)]


def test_fit_warns_before_training_on_a_slow_cpu(module, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(mmgpt.train.precision, "cpu_has_fast_matmul", lambda dtype: dtype != torch.bfloat16)
    (message,) = fit_one_step(module(), tmp_path, "bf16-mixed")
    assert "bf16-mixed" in message and "--trainer.precision=32-true" in message
    assert fit_one_step(module(), tmp_path, "32-true") == []
    monkeypatch.setattr(mmgpt.train.precision, "cpu_has_fast_matmul", lambda dtype: True)
    assert fit_one_step(module(), tmp_path, "bf16-mixed") == []
