"""projector.whiten: the ZCA whitening of the MLP's input, fitted once from training images."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from conftest import tiny_data

import mmgpt
from mmgpt.config import ProjectorConfig
from mmgpt.data import ShapesConfig
from mmgpt.data.datamodule import DataSource, MMGPTDataModule
from mmgpt.models.projector import Projector
from mmgpt.train.module import MMGPTModule


def test_fitted_whitening_gives_zero_mean_and_identity_covariance():
    torch.manual_seed(0)
    # Badly conditioned features, as a frozen tower gives: variances spanning four decades, correlated, offset.
    mixing = torch.randn(16, 16) @ torch.diag(torch.logspace(0, -2, 16))
    features = torch.randn(4000, 4, 16) @ mixing.T + 3.0  # (N, tokens, dim)
    projector = Projector(ProjectorConfig(whiten=True, input_norm=False), 16, (2, 2), 8)
    assert not projector.whitened and torch.equal(projector.whiten_matrix, torch.eye(16))  # identity until fitted
    projector.fit_whitening(features, eps=1e-8)
    assert projector.whitened
    white = (features.reshape(-1, 16) - projector.whiten_mean) @ projector.whiten_matrix
    assert white.mean(0).abs().max() < 1e-4
    assert torch.allclose(torch.cov(white.T), torch.eye(16), atol=2e-2)  # float32 buffers, variances over 1e4
    # ZCA, not any whitening: the matrix is symmetric, so features stay as close to their own axes as they can.
    assert torch.allclose(projector.whiten_matrix, projector.whiten_matrix.T, atol=1e-4)
    # The forward pass reads exactly those whitened features.
    x = features[:3]
    expected = projector.mlp((x - projector.whiten_mean) @ projector.whiten_matrix)
    assert torch.allclose(projector(x), expected, atol=1e-6)


def test_eps_caps_how_much_a_dead_direction_is_scaled_up():
    torch.manual_seed(0)
    features = torch.randn(2000, 8)
    features[:, 0] = 0.0  # a direction with no variance at all
    projector = Projector(ProjectorConfig(whiten=True, input_norm=False), 8, (1, 1), 4)
    projector.fit_whitening(features, eps=1e-2)
    assert torch.isfinite(projector.whiten_matrix).all()
    assert projector.whiten_matrix[0, 0] <= 1e-2 ** -0.5 + 1e-3  # at most eps^-1/2 times the strongest direction


def test_fit_whitening_errors():
    with pytest.raises(ValueError, match="projector.whiten=False"):
        Projector(ProjectorConfig(), 8, (1, 1), 4).fit_whitening(torch.randn(100, 8))
    with pytest.raises(ValueError, match="10 feature vectors for width 16"):
        Projector(ProjectorConfig(whiten=True), 16, (1, 1), 4).fit_whitening(torch.randn(10, 16))
    assert not hasattr(Projector(ProjectorConfig(), 8, (1, 1), 4), "whiten_matrix")  # nothing saved without it


def whitening_module(tiny_parts, **kwargs) -> MMGPTModule:
    torch.manual_seed(0)
    projector = dataclasses.replace(tiny_parts["projector"], whiten=True)
    return MMGPTModule(**{**tiny_parts, "projector": projector}, **kwargs)


def test_training_fits_the_whitening_once_and_it_is_saved(tiny_parts, tmp_path):
    m = whitening_module(tiny_parts, freeze_vision=True)

    def fit(m, ckpt_path=None, max_steps=1):
        trainer = L.Trainer(
            max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        )
        data = MMGPTDataModule(
            train=[DataSource("shapes", size=60)], shapes=ShapesConfig(image_size=32), batch_size=16, max_length=96,
            processor=m.processor, image_seq_len=m.image_seq_len,
        )
        trainer.fit(m, datamodule=data, ckpt_path=ckpt_path)
        return trainer

    trainer = fit(m)
    p = m.model.projector
    assert p.whitened and not torch.equal(p.whiten_matrix, torch.eye(p.whiten_matrix.size(0)))
    # Fitted on the tower's features of training images: those come out (nearly) white.
    batch = next(iter(trainer.datamodule.train_dataloader()))
    with torch.no_grad():
        x = p.mlp_inputs(m.model.vision(batch["images"])).flatten(0, 1)
    white = (x - p.whiten_mean) @ p.whiten_matrix
    assert white.mean(0).abs().mean() < 0.5 and 0.2 < white.var(0).mean() < 2.0
    # A resumed run keeps the fitted statistics instead of measuring again.
    ckpt = next(tmp_path.rglob("*.ckpt"))
    fitted = p.whiten_matrix.clone()
    resumed = whitening_module(tiny_parts, freeze_vision=True)
    fit(resumed, ckpt_path=str(ckpt), max_steps=2)
    assert torch.equal(resumed.model.projector.whiten_matrix, fitted)
    # Saved and loaded with the weights.
    out = tmp_path / "export"
    mmgpt.Pipeline(m.model, m.tokenizer).save_pretrained(out)
    loaded = mmgpt.load(out).model.projector
    assert loaded.whitened and torch.equal(loaded.whiten_matrix, fitted)


def test_whitening_needs_a_frozen_tower(tiny_parts):
    with pytest.raises(ValueError, match="freeze_vision=True"):
        whitening_module(tiny_parts, freeze_vision=False)


def test_too_few_training_images_to_whiten_is_a_clear_error(tiny_parts, tmp_path):
    m = whitening_module(tiny_parts, freeze_vision=True)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"gave \d+ images, 32 feature vectors of width 128.*more vectors"):
        trainer.fit(m, datamodule=tiny_data(m))
