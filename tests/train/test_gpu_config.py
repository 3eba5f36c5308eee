"""configs/shapes_gpu.yaml: parses through the CLI, is internally consistent, and trains a step on CPU once shrunk."""

from __future__ import annotations

import math

import pytest
import yaml
from conftest import ROOT, cli

from mmgpt.data import MMGPTDataModule, ShapesDataset
from mmgpt.train.cli import MMGPTCLI
from mmgpt.train.module import MMGPTModule

GPU_YAML = ROOT / "configs" / "shapes_gpu.yaml"

# What a CPU needs instead of the GPU setup, and a model small enough to step in a second. Everything else (the
# callbacks, loggers, data sources, gradient checkpointing, freezing, schedule) runs as the file says.
ON_CPU = (
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
    "--data.num_workers=0",
)
SHRUNK = (
    "--model.vision.img_size=32", "--model.vision.overrides={depth: 1, embed_dim: 32, num_heads: 2}",
    "--data.shapes.image_size=32", "--model.projector.hidden_dim=64",
    "--model.decoder.n_layer=2", "--model.decoder.n_head=2", "--model.decoder.n_query_groups=1",
    "--model.decoder.n_embd=32", "--model.decoder.intermediate_size=64",
    "--data.batch_size=4", "--model.eval_samples=4", "--model.max_new_tokens=4",
)


def test_gpu_config_parses_and_is_consistent(capsys):
    with pytest.raises(SystemExit) as exit_info:
        MMGPTCLI(MMGPTModule, MMGPTDataModule, args=["fit", "--config", str(GPU_YAML), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert (trainer["accelerator"], trainer["strategy"], trainer["precision"]) == ("gpu", "ddp", "bf16-mixed")
    assert model["gradient_checkpointing"] is True
    # Scenes are rendered at the size the ViT reads, so no resampling blurs them.
    assert data["shapes"]["image_size"] == model["vision"]["img_size"]
    # Generation after the longest training row still fits the RoPE table and KV cache.
    assert data["max_length"] + model["max_new_tokens"] <= model["decoder"]["block_size"]
    # Validation covers the whole val split, and the generation-scored subset lies within it.
    (val,) = data["val"]
    n_val = len(ShapesDataset("val", val["size"], qa_per_scene=val["qa_per_scene"], text_fraction=val["text_fraction"]))
    assert trainer["limit_val_batches"] * data["batch_size"] >= n_val >= model["eval_samples"]


def test_gpu_config_fast_dev_runs_on_cpu(tmp_path):
    run = cli(tmp_path, "fit", *ON_CPU, *SHRUNK, "--trainer.fast_dev_run=true", config=GPU_YAML)
    assert run.trainer.global_step == 1
    assert run.model.model.decoder.gradient_checkpointing  # the step ran with checkpointed decoder blocks
    assert run.model.hparams.freeze_vision and not any(p.requires_grad for p in run.model.model.vision.parameters())
    assert math.isfinite(float(run.trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(run.trainer.callback_metrics["val/loss"]))
