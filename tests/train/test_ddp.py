"""Scale-out is Lightning's: the tiny config trained with ``strategy=ddp`` on 2 CPU processes takes exactly the step
that one process takes on the same global batch.

What must hold for the two to be the same computation:

* The same samples. Lightning swaps the train sampler for a ``DistributedSampler`` (its own seeded permutation,
  interleaved over ranks) where one process has a ``RandomSampler`` (another permutation). Whatever the order, a
  train set of ``N_SAMPLES`` read as one batch of ``N_SAMPLES`` by one process, or as ``N_SAMPLES / 2`` per rank
  by two, is the whole set in both runs. ``N_SAMPLES`` is even, so ``DistributedSampler`` pads nothing.
* The same loss. The loss is a mean over supervised tokens and DDP averages gradients over ranks; the ranks here
  hold different token counts, so a mean of per-rank means is not the global mean. ``MMGPTModule.training_step``
  normalises by the global count (see there); the test checks the ranks do differ, or it would prove nothing.
* The same starting weights: ``seed_everything`` in the config, and DDP broadcasts rank 0's anyway.

Gradients are the sharp check: AdamW's first step is ``lr * g / (|g| + eps)``, nearly ``lr * sign(g)``, so the
updated weights do not see the gradient's overall scale (a loss off by a constant factor, such as a missing world
size, gives the same weights). Both are compared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from conftest import cli, train_script

from mmgpt.data.collate import IGNORE_INDEX

HERE = Path(__file__).resolve().parent  # this file's probe and, one up, conftest

SCENES = 2  # shapes scenes; each gives a caption, 3 questions and a text sample (configs/tiny.yaml)
N_SAMPLES = 5 * SCENES


class FirstStepProbe(L.Callback):
    """Saves what this rank saw and did in its first step: sample ids, supervised tokens, the logged loss, the
    gradients as the optimizer gets them (already averaged over ranks by DDP), and the weights after the step."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.grads: dict[str, torch.Tensor] = {}
        self.initial: dict[str, torch.Tensor] = {}

    @staticmethod
    def _weights(pl_module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}  # tied weights once

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = self._weights(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}
        # The learning rate this step uses (the scheduler changes it right after the step).
        (self.lr,) = {group["lr"] for group in optimizer.param_groups}
        (self.eps,) = {group["eps"] for group in optimizer.param_groups}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {
            "ids": batch["ids"],
            "tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
            "loss": float(trainer.callback_metrics["train/loss"]),
            "world_size": trainer.world_size,
            "grads": self.grads,
            "initial": self.initial,
            "weights": self._weights(pl_module),
            "lr": self.lr,
            "eps": self.eps,
        }
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")


def _fit_args(out_dir: Path, batch_size: int) -> list[str]:
    probe = {"class_path": "test_ddp.FirstStepProbe", "init_args": {"out_dir": str(out_dir)}}
    return [
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", f"--trainer.callbacks={json.dumps([probe])}",
        f"--data.train=[{{kind: shapes, size: {SCENES}}}]", f"--data.batch_size={batch_size}",
    ]


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single_dir.mkdir()
    ddp_dir.mkdir()

    # Two processes through the real CLI: Lightning's launcher re-runs scripts/train.py once per rank, and each
    # rank imports this file's probe (hence tests/ on the path).
    proc = train_script(
        "fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={ddp_dir}",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        *_fit_args(ddp_dir, N_SAMPLES // 2),
        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH")]))},
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # The reference: one process (no strategy, no distributed sampler) with the whole set in one batch.
    run = cli(single_dir, "fit", *_fit_args(single_dir, N_SAMPLES))
    assert run.trainer.global_step == 1

    single = _load(single_dir / "rank0.pt")
    ranks = [_load(ddp_dir / f"rank{r}.pt") for r in range(2)]
    assert single["world_size"] == 1 and all(r["world_size"] == 2 for r in ranks)
    # Premises: the same samples, split over the ranks, with different token counts on each rank (equal counts
    # would make a mean of per-rank means right by accident).
    assert len(single["ids"]) == N_SAMPLES
    assert sorted(ranks[0]["ids"] + ranks[1]["ids"]) == sorted(single["ids"])
    assert ranks[0]["tokens"] != ranks[1]["tokens"], "equal token counts per rank: change SCENES"
    assert ranks[0]["tokens"] + ranks[1]["tokens"] == single["tokens"]

    # Tolerances: float32 sums of the same terms in a different order (two partial sums per gradient, all-reduced
    # and halved; matmuls over other batch and padding shapes) differ by a few units in the last place of the
    # sum's magnitude: measured 1e-7 of the largest gradient and of the loss. 1e-5 leaves margin and is still far
    # below a wrongly weighted loss: a mean of per-rank means (37 and 36 tokens here) moved gradients by 8.5e-3.
    # The logged loss is the global-batch mean on every rank.
    for r in ranks:
        assert abs(r["loss"] - single["loss"]) <= 1e-5 * single["loss"], (r["loss"], single["loss"])

    grads = single["grads"]
    assert grads.keys() == ranks[0]["grads"].keys() == ranks[1]["grads"].keys()
    scale = max(g.abs().max() for g in grads.values())
    for name, g in grads.items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-5, atol=1e-5 * scale, msg=name)

    # The step: the same starting weights, moved by it; both ranks hold bit-identical replicas afterwards (every
    # rank gets the same all-reduced gradient); and they agree with the single process up to what the gradients'
    # rounding can change. AdamW's first step moves a weight by lr * g / (|g| + eps), whose slope in g is at most
    # lr / eps (at g = 0): near g ~ eps = 1e-8 a gradient gap of 1e-11 shows as ~1e-6 in the weight, so the bound
    # is per element, from the measured gradient gap, plus float32 rounding of the weight and of the step.
    lr, eps = single["lr"], single["eps"]
    assert lr > 0 and all(r["lr"] == lr and r["eps"] == eps for r in ranks)
    moved = {n for n, w in single["weights"].items() if not torch.equal(w, single["initial"][n])}
    assert moved == set(single["weights"])
    for name, w in single["weights"].items():
        assert torch.equal(ranks[0]["initial"][name], single["initial"][name]), name
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        bound = lr / eps * (ranks[0]["grads"][name] - grads[name]).abs() + 1e-6 * (w.abs() + lr)
        gap = (ranks[0]["weights"][name] - w).abs()
        assert (gap <= bound).all(), f"{name}: weights differ by up to {gap.max():.2e}, beyond the bound"
