"""Gradient checkpointing: the decoder blocks are recomputed in backward, and the gradients do not change."""

from __future__ import annotations

import dataclasses

import torch
import torch.utils.checkpoint

import mmgpt.models.decoder
from mmgpt.data import DataSource, MMGPTDataModule, ShapesConfig
from mmgpt.train.module import MMGPTModule


def _module(tiny_parts, checkpointing: bool) -> MMGPTModule:
    parts = dict(tiny_parts)
    # Dropout on: the recomputed forward must draw the very masks of the first one (checkpoint restores the RNG).
    parts["decoder"] = dataclasses.replace(parts["decoder"], dropout=0.1)
    torch.manual_seed(0)
    return MMGPTModule(**parts, gradient_checkpointing=checkpointing).train()


def _batch(m: MMGPTModule) -> dict:
    data = MMGPTDataModule(
        train=[DataSource("shapes", size=1)], shapes=ShapesConfig(image_size=32), max_length=96,
        processor=m.processor, image_seq_len=m.image_seq_len,
    )
    return data.collator()([data.dataset("train")[i] for i in range(5)])  # caption, questions, text


def _block_calls(m: MMGPTModule) -> list[int]:
    calls = [0]

    def count(module, args):
        calls[0] += 1

    # A pre-hook: the recomputation stops as soon as it has what backward needs, before a block's forward returns.
    for block in m.model.decoder.h:
        block.register_forward_pre_hook(count)
    return calls


def _grads_and_calls(m: MMGPTModule, batch: dict) -> tuple[dict[str, torch.Tensor], int]:
    calls = _block_calls(m)
    torch.manual_seed(1)  # the same dropout masks in both runs
    loss, _ = m.loss(batch)
    loss.backward()
    return {n: p.grad for n, p in m.model.named_parameters()}, calls[0]


def test_checkpointing_recomputes_blocks_with_the_same_gradients(tiny_parts):
    plain, ckpt = _module(tiny_parts, False), _module(tiny_parts, True)
    assert ckpt.hparams.gradient_checkpointing and ckpt.model.decoder.gradient_checkpointing
    assert not plain.model.decoder.gradient_checkpointing
    batch = _batch(plain)
    expected, plain_calls = _grads_and_calls(plain, batch)
    grads, ckpt_calls = _grads_and_calls(ckpt, batch)
    n_layer = len(plain.model.decoder.h)
    assert plain_calls == n_layer and ckpt_calls == 2 * n_layer  # each block ran again in backward
    assert expected.keys() == grads.keys()
    for name, g in expected.items():
        assert g is not None and g.abs().sum() > 0, name
        # The recomputation repeats the same ops on the same inputs: equal up to float32 rounding at most.
        torch.testing.assert_close(grads[name], g, msg=name)


def test_checkpointing_only_when_training_with_grad(tiny_parts, monkeypatch):
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(mmgpt.models.decoder, "checkpoint", counting_checkpoint)
    m = _module(tiny_parts, True)
    batch = _batch(m)
    m.loss(batch)
    assert len(calls) == len(m.model.decoder.h)
    assert all(kw == {"use_reentrant": False} for kw in calls)
    calls.clear()
    with torch.no_grad():  # nothing is kept for backward anyway
        m.loss(batch)
    m.eval()  # validation, generation
    m.loss(batch)
    m.train()
    m.model.decoder.gradient_checkpointing_disable()
    m.loss(batch)
    assert calls == []
