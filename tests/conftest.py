"""Shared fixtures: the shipped tokenizer, a test-sized model (the architecture of configs/tiny.yaml), a pipeline,
and one short training run whose checkpoint several test files load."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.data.datamodule import DataSource, MMGPTDataModule
from mmgpt.data.shapes import ShapesConfig
from mmgpt.models.mmgpt import MMGPT
from mmgpt.pipeline import Pipeline
from mmgpt.prompts import IMAGE
from mmgpt.tokenizer import load_tokenizer
from mmgpt.train.module import MMGPTModule

# The components of configs/tiny.yaml: a 2-block ViT at 32 px with 8 px patches (4x4 grid), pixel shuffle 2
# (4 image tokens), and a 2-layer GQA decoder.
TINY_VISION = dict(
    name="vit_tiny_patch16_224", img_size=32, patch_size=8, overrides=dict(depth=2, embed_dim=32, num_heads=2)
)
TINY_PROJECTOR = dict(pixel_shuffle=2)
TINY_DECODER = dict(block_size=128, n_layer=2, n_head=4, n_query_groups=2, n_embd=32)

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "configs" / "tiny.yaml"

# Test-sized matmuls gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's thread barriers
# make each one ~1000x slower (15 ms instead of 15 us).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def tiny_config(tokenizer) -> MMGPTConfig:
    """A fresh (mutable) config per test."""
    return MMGPTConfig(
        vision=VisionConfig(**TINY_VISION),
        projector=ProjectorConfig(**TINY_PROJECTOR),
        decoder=DecoderConfig(vocab_size=len(tokenizer), **TINY_DECODER),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )


@pytest.fixture
def tiny_parts() -> dict:
    """The component configs as ``MMGPTModule`` takes them (it sets the vocabulary from the tokenizer)."""
    return dict(
        vision=VisionConfig(**TINY_VISION), projector=ProjectorConfig(**TINY_PROJECTOR),
        decoder=DecoderConfig(**TINY_DECODER),
    )


@pytest.fixture
def model(tiny_config) -> MMGPT:
    torch.manual_seed(0)
    return MMGPT(tiny_config).eval()


def make_lively(model: MMGPT, seed: int = 0) -> MMGPT:
    """``model`` with O(1) random weights, in eval mode: at the default 0.02 init a tied-embedding decoder just
    repeats its last token, and a test of generation would compare runs of one constant token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3, generator=g)
    return model.eval()


@pytest.fixture
def lively(model):
    """The tiny model with O(1) random weights (``make_lively``)."""
    return make_lively(model)


@pytest.fixture
def module(tiny_parts):
    """``module(**kwargs)`` builds an ``MMGPTModule`` of the tiny architecture; ``decoder=`` overrides fields."""

    def build(decoder=None, **kwargs) -> MMGPTModule:
        parts = dict(tiny_parts)
        parts["decoder"] = dataclasses.replace(parts["decoder"], **(decoder or {}))
        torch.manual_seed(0)
        return MMGPTModule(**parts, **kwargs)

    return build


def tiny_data(m: MMGPTModule) -> MMGPTDataModule:
    return MMGPTDataModule(
        train=[DataSource("shapes", size=2)], val=[DataSource("shapes", size=1)],
        shapes=ShapesConfig(image_size=32), batch_size=4, max_length=96,
        processor=m.processor, image_seq_len=m.image_seq_len,
    )


@pytest.fixture
def pipeline(model, tokenizer) -> Pipeline:
    return Pipeline(model, tokenizer)


@pytest.fixture
def images() -> torch.Tensor:
    """Three different normalized 32 px images ``(3, 3, 32, 32)``."""
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A 2-step fit of the tiny model on tiny shapes data: ``(module, checkpoint path)``."""
    import lightning as L

    from mmgpt.data.datamodule import DataSource, MMGPTDataModule
    from mmgpt.data.shapes import ShapesConfig
    from mmgpt.train.module import MMGPTModule

    root = tmp_path_factory.mktemp("fit")
    L.seed_everything(0, verbose=False)
    module = MMGPTModule(
        VisionConfig(**TINY_VISION), ProjectorConfig(**TINY_PROJECTOR), DecoderConfig(**TINY_DECODER),
        lr=3e-3, warmup_steps=1, eval_every_n_validations=0,
    )
    data = MMGPTDataModule(
        train=[DataSource("shapes", size=4)], val=[DataSource("shapes", size=1)], test=[DataSource("shapes", size=1)],
        shapes=ShapesConfig(image_size=32), batch_size=4, max_length=96,
        processor=module.processor, image_seq_len=module.image_seq_len,
    )
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=root,
    )
    trainer.fit(module, datamodule=data)
    # The checkpoint Lightning's ModelCheckpoint wrote at the end of the run (optimizer state and all).
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    return module.eval(), ckpt


def cli(tmp_path, subcommand: str, *args: str, config: Path = TINY_YAML):
    """Run the CLI in-process (what scripts/train.py does), quiet and writing under tmp_path."""
    from mmgpt.data.datamodule import MMGPTDataModule
    from mmgpt.train.cli import MMGPTCLI
    from mmgpt.train.module import MMGPTModule

    return MMGPTCLI(
        MMGPTModule, MMGPTDataModule, save_config_kwargs={"overwrite": True},
        args=[
            subcommand, "--config", str(config), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *args,
        ],
    )


def train_script(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python scripts/train.py ARGS`` in a fresh process (needed where Lightning launches processes itself).

    One OpenMP thread per process, for the reason ``torch.set_num_threads(1)`` is set above.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "scripts/train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
