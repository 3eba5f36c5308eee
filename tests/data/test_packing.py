"""Packed training rows (``data.packing``): every sample once, attention kept within each sample, and the very
same logits, loss and gradients as one padded row per sample."""

from __future__ import annotations

import pytest
import torch
from conftest import make_lively

from mmgpt.data import IGNORE_INDEX, Collator, DataSource, MMGPTDataModule, ShapesConfig
from mmgpt.models.mmgpt import MMGPT
from mmgpt.train.module import MMGPTModule


def shapes_data(model, packing: bool = True, max_length: int = 64, batch_size: int = 12) -> MMGPTDataModule:
    return MMGPTDataModule(
        train=[DataSource("shapes", size=6, qa_per_scene=2)], shapes=ShapesConfig(image_size=32),
        batch_size=batch_size, max_length=max_length, packing=packing,
        processor=model.processor, image_seq_len=model.image_seq_len,
    )


def both_layouts(model, n: int = 12, max_length: int = 64) -> tuple[dict, dict]:
    data = shapes_data(model, max_length=max_length)
    samples = [data.dataset("train")[i] for i in range(n)]
    return data.collator("train")(samples), data.collator("train", pack=True)(samples)


def test_collator_packs_every_sample_exactly_once(model):
    padded, packed = both_layouts(model)
    R, T = packed["input_ids"].shape
    assert T <= 64 and R < padded["input_ids"].size(0)  # fewer rows than samples
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum()  # no token lost or added
    # Real slots fill the packed rows far better than padded rows fill theirs.
    assert packed["attention_mask"].float().mean() > padded["attention_mask"].float().mean()
    assert packed["ids"] == padded["ids"] and torch.equal(packed["prefix_lengths"], padded["prefix_lengths"])
    for i in range(len(packed["ids"])):
        n = int(padded["attention_mask"][i].sum())
        where = packed["segment_ids"] == i
        assert int(where.sum()) == n  # one contiguous run (checked through the positions below)
        row = int(where.any(1).nonzero())
        assert torch.equal(packed["input_ids"][where], padded["input_ids"][i, :n])
        assert torch.equal(packed["position_ids"][where], torch.arange(n))
        # Same targets; only a sample's first slot is never one (its predecessor belongs to another sample).
        assert torch.equal(packed["labels"][where][1:], padded["labels"][i, 1:n])
        assert packed["labels"][where][0] == IGNORE_INDEX
        assert where[row].nonzero().flatten().diff().eq(1).all()
    assert (packed["segment_ids"] == -1).eq(packed["attention_mask"] == 0).all()
    # Images follow the slots, in the order the model's splice fills them (row-major).
    image_id = model.config.image_token_id
    order = []
    for r in range(R):
        for seg in packed["segment_ids"][r].unique_consecutive().tolist():
            if seg >= 0 and (packed["input_ids"][r][packed["segment_ids"][r] == seg] == image_id).any():
                order.append(seg)
    with_image = [i for i in range(len(padded["ids"])) if (padded["input_ids"][i] == image_id).any()]
    padded_index = {s: k for k, s in enumerate(with_image)}
    assert sorted(order) == with_image and order != with_image  # reordered, so the check has teeth
    assert torch.equal(packed["images"], padded["images"][[padded_index[s] for s in order]])


@pytest.mark.parametrize("attention", ["causal", "prefix"])
def test_packed_logits_equal_each_sample_alone(tiny_config, attention):
    tiny_config.decoder.attention = attention
    torch.manual_seed(0)
    model = make_lively(MMGPT(tiny_config))
    padded, packed = both_layouts(model)
    with torch.no_grad():
        alone = model(padded["input_ids"], padded["images"], prefix_lengths=padded["prefix_lengths"])
        together = model(
            packed["input_ids"], packed["images"], prefix_lengths=packed["prefix_lengths"],
            position_ids=packed["position_ids"], segment_ids=packed["segment_ids"],
        )
        # Without the segment mask, samples would see their row neighbours: the mask is what makes it exact.
        leaky = model(packed["input_ids"], packed["images"], position_ids=packed["position_ids"],
                      attn_mask=torch.ones(1, 1, *packed["input_ids"].shape[1:] * 2, dtype=torch.bool).tril())
    for i in range(len(packed["ids"])):
        n = int(padded["attention_mask"][i].sum())
        where = packed["segment_ids"] == i
        torch.testing.assert_close(together[where], alone[i, :n], atol=1e-4, rtol=1e-4)
    second = packed["segment_ids"] != packed["segment_ids"][:, :1]  # slots after each row's first sample
    second &= packed["segment_ids"] >= 0
    assert packed["input_ids"].size(0) < len(packed["ids"]) and second.any()
    assert not torch.allclose(leaky[second], together[second], atol=1e-3)


@pytest.mark.parametrize("per", ["token", "sample"])
def test_packed_loss_and_gradients_equal_padded(tiny_parts, per):
    def grads(packing: bool) -> tuple[torch.Tensor, dict]:
        torch.manual_seed(0)
        m = MMGPTModule(**tiny_parts, loss_weighting=per)
        make_lively(m.model).train()
        data = shapes_data(m, packing=packing)
        batch = data.collator("train", packing)([data.dataset("train")[i] for i in range(12)])
        total, units = m.summed_loss(batch, per=per)
        (total / units).backward()
        return total.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    (padded_loss, padded_grads), (packed_loss, packed_grads) = grads(False), grads(True)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-4, rtol=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 10
    for name, g in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_datamodule_packing_reaches_the_training_loader(model):
    batch = next(iter(shapes_data(model, packing=True).train_dataloader()))
    assert {"segment_ids", "position_ids"} <= batch.keys() and batch["input_ids"].size(0) < 12
    assert "segment_ids" not in next(iter(shapes_data(model, packing=False).train_dataloader()))


def test_packing_errors(model, tokenizer):
    with pytest.raises(ValueError, match="pack=True is for training rows"):
        Collator(tokenizer, model.processor, model.image_seq_len, mode="generate", pack=True)
    _, packed = both_layouts(model, n=4)
    with pytest.raises(ValueError, match="segment_ids .* go with position_ids"):
        model(packed["input_ids"], packed["images"], segment_ids=packed["segment_ids"])
