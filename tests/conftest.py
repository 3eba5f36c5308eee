"""Shared fixtures: the shipped tokenizer, a test-sized model (the architecture of configs/tiny.yaml), a pipeline,
and one short training run whose checkpoint several test files load."""

from __future__ import annotations

import os

# Nothing in the tests may reach a hub. mmgpt passes local_files_only=True to every from_pretrained; this also
# covers the HF oracles the tests build. Set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.data import DataSource, MMGPTDataModule, ShapesConfig
from mmgpt.models.decoder import Decoder
from mmgpt.models.mmgpt import MMGPT
from mmgpt.pipeline import Pipeline
from mmgpt.prompts import ASSISTANT, IMAGE
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
    """Three different 32 px images ``(3, 3, 32, 32)`` with pixels in [0, 1]: what the image processor takes, and
    as good as normalized pixels for tests that feed the model directly."""
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A 2-step fit of the tiny model on tiny shapes data: ``(module, checkpoint path)``."""
    import lightning as L

    from mmgpt.data import DataSource, MMGPTDataModule, ShapesConfig
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


def assert_lively(out: torch.Tensor) -> None:
    # The equalities below have teeth only if rows differ from each other and are not one repeated token.
    rows = out.tolist()
    assert len({tuple(r) for r in rows}) == len(rows)
    assert all(len(set(r)) > 3 for r in rows)


def scripted(tokenizer, text: str, tiny_config) -> Pipeline:
    """A pipeline whose model writes ``text`` and then eos, whatever the prompt.

    Every attention and MLP output is zero, so the logits depend on the last token alone; each token of the
    script has its own embedding direction, and the untied lm_head maps it to the next one.
    """
    script = [tokenizer.convert_tokens_to_ids(ASSISTANT), *tokenizer(text, add_special_tokens=False)["input_ids"],
              tokenizer.eos_token_id]
    assert len(set(script)) == len(script), "each token of the script needs a single successor"
    tiny_config.decoder.tie_embeddings = False
    model = MMGPT(tiny_config).eval()
    with torch.no_grad():
        for block in model.decoder.h:
            block.attn.proj.weight.zero_()
            block.mlp.proj.weight.zero_()
        model.decoder.wte.weight.zero_()
        model.decoder.lm_head.weight.zero_()
        for i, (token, successor) in enumerate(itertools.pairwise(script)):
            model.decoder.wte.weight[token, i] = 1.0
            model.decoder.lm_head.weight[successor, i] = 10.0
    return Pipeline(model, tokenizer)


@pytest.fixture(params=["causal", "prefix"])
def engine(request, tiny_config, tokenizer):
    """A lively tiny model and its pipeline, in each attention mode."""
    tiny_config.decoder.attention = request.param
    torch.manual_seed(0)
    model = make_lively(MMGPT(tiny_config))
    return model, Pipeline(model, tokenizer)


def mixed_requests(images):
    return (
        [[images[0], images[1]], None, images[2], [images[2], images[0], images[1]]],
        ["Compare the two images.", "What is one plus one?", "Describe the image.", "Hi"],
    )


# The native decoder alone (its HF oracle and quantization tests): 2 layers, GQA with 4 heads in 2 groups.
RANDOM_DECODER = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_query_groups=2, n_embd=32)


def random_decoder(seed: int = 0, *, fan_in_std: bool = False, **overrides) -> Decoder:
    """A native decoder whose every weight, norms included, is random and O(1), in eval mode: at the 0.02 init the
    logits are all near zero, and a swapped or misplaced tensor, or a rounding error, would hide under them.

    Args:
        seed: the torch seed, set before the decoder is built.
        fan_in_std: linear weights N(0, 1/fan_in) and the embedding N(0, 1), so that every layer keeps the scale of
            its input (with larger weights a random network amplifies any perturbation layer after layer, and a
            comparison of rounding errors would measure that chaos). Otherwise every weight is N(0, 0.3).
        **overrides: ``DecoderConfig`` fields over ``RANDOM_DECODER``.
    """
    config = DecoderConfig(**{**RANDOM_DECODER, **overrides})
    torch.manual_seed(seed)
    decoder = Decoder(config).eval()
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.uniform_(0.5, 1.5)
            elif not fan_in_std:
                p.normal_(0.0, 0.3)
            elif name == "wte.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p.size(1) ** -0.5)
    return decoder
