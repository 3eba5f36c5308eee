"""Length-grouped batching: every sample once per epoch, far less padding, reproducible order."""

from __future__ import annotations

import random

import pytest

from mmgpt.data import DataSource, Mixture, MMGPTDataModule, ShapesConfig, ShapesDataset
from mmgpt.data.length_grouped import LengthGroupedSampler
from mmgpt.models.image_processor import ImageProcessor


def padded_fraction(order: list[int], lengths: list[int], batch_size: int) -> float:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / padded


def test_sampler_is_a_permutation_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.choice([10, 12, 40, 45]) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, mega_batch=10, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(1000))  # each index exactly once
    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    assert padded_fraction(order, lengths, 8) < 0.1 < padded_fraction(shuffled, lengths, 8)
    assert list(LengthGroupedSampler(lengths, 8, 10, seed=3)) == order  # reproducible
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(1000))  # a new order each epoch


def test_shapes_lengths_follow_the_samples():
    ds = ShapesDataset("train", size=6, config=ShapesConfig(image_size=32), qa_per_scene=2)
    lengths = ds.lengths()
    assert lengths == [len(ds[i].prompt) + len(ds[i].target) for i in range(len(ds))]
    mix = Mixture([ds, ShapesDataset("val", size=3)], [1.0, 1.0], length=10, seed=0)
    assert mix.lengths() == [len(mix[i].prompt) + len(mix[i].target) for i in range(10)]


def test_datamodule_groups_by_length_and_says_when_it_cannot(tmp_path):
    kwargs = dict(shapes=ShapesConfig(image_size=32), batch_size=8, processor=ImageProcessor(img_size=32),
                  image_seq_len=4)
    grouped = MMGPTDataModule(train=[DataSource("shapes", size=40)], group_by_length=True, **kwargs)
    plain = MMGPTDataModule(train=[DataSource("shapes", size=40)], **kwargs)

    def padding(dm) -> float:
        masks = [b["attention_mask"] for b in dm.train_dataloader()]
        return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    assert padding(grouped) < padding(plain) / 2
    text = tmp_path / "t.txt"
    text.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="group_by_length needs length estimates, which TextFile"):
        MMGPTDataModule(train=[DataSource("text", path=str(text))], group_by_length=True, **kwargs).train_dataloader()
