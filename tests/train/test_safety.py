"""Training that cannot be turned against its user or silently lost: ``--ckpt_path`` never runs code from a file, a
diverging run stops at its first non-finite step and leaves no NaN checkpoint, ``last.ckpt`` is written every N
steps and at the end, and a run killed with SIGKILL resumes from it to the very weights of an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, cli, tiny_data, train_script
from test_checkpoint import evil_checkpoint, serve

from mmgpt.finite_weights import nonfinite_tensors
from mmgpt.train.callbacks import PeriodicCheckpoint
from mmgpt.train.module import MMGPTModule

QUIET = ["--trainer.logger=false", "--trainer.limit_val_batches=0", "--model.eval_every_n_validations=0"]
# One training sample (one scene's caption) in batches of one: every epoch is the same single step, so the data a
# step sees cannot depend on where a run was interrupted (Lightning does not restore a plain DataLoader's position
# mid-epoch, nor the RNG that shuffles it). The schedule is fixed by lr_decay_steps, not by max_steps, so runs of
# different lengths share it.
ONE_SAMPLE = [
    "--data.train=[{kind: shapes, size: 1, tasks: [caption]}]", "--data.batch_size=1", "--trainer.max_epochs=-1",
    "--model.lr_decay_steps=40", "--model.warmup_steps=3",
]


def checkpoints(root: Path) -> list[Path]:
    return sorted(root.rglob("*.ckpt"))


def assert_all_finite(root: Path) -> None:
    for path in checkpoints(root):
        assert nonfinite_tensors(torch.load(path, weights_only=True)["state_dict"]) == [], path


# ---------------------------------------------------------------------------------------------------------
# --ckpt_path: local files only, always weights_only=True


@pytest.fixture
def evil(tmp_path):
    ckpt, marker = evil_checkpoint(tmp_path)
    with serve(tmp_path) as (base, requests):
        yield marker, {"local": str(ckpt), "file": ckpt.as_uri(), "http": f"{base}/{ckpt.name}"}, requests


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
@pytest.mark.parametrize("where", ["local", "file", "http"])
def test_ckpt_path_never_runs_a_malicious_checkpoint(evil, tmp_path, subcommand, where):
    marker, urls, requests = evil
    with pytest.raises(ValueError, match="ckpt_path=") as error:
        cli(tmp_path, subcommand, f"--ckpt_path={urls[where]}", *QUIET)
    assert urls[where] in str(error.value)
    assert ("weights_only=True" if where == "local" else "not a local path") in str(error.value)
    assert not marker.exists() and not requests  # nothing ran, nothing was fetched


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ckpt_path=s3://bucket/last.ckpt"], "not a local path"),
        (["--ckpt_path=simplecache::http://127.0.0.1:9/last.ckpt"], "not a local path"),
        (["--ckpt_path=registry:org/model"], "not a local path"),
        (["--ckpt_path=no/such/last.ckpt"], "no such file"),
        (["--weights_only=false"], "weights_only=false"),
    ],
)
def test_ckpt_path_and_weights_only_errors(tmp_path, args, expected):
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        cli(tmp_path, "fit", *args, *QUIET)


# ---------------------------------------------------------------------------------------------------------
# Non-finite loss or gradients stop training; no checkpoint holds NaN


def test_diverging_fit_stops_with_a_clear_error(tmp_path):
    # lr=1e4: the first step is finite, a later one's gradients or loss are not (which step depends on the CPU's
    # kernels); the rate reported is the one that step used, (step + 1)/5 of 1e4 in tiny.yaml's 5-step warmup.
    # Checkpoints every step, and on the exception too, so that a NaN one would be written if anything let it
    # through.
    callback = '[{class_path: mmgpt.train.callbacks.PeriodicCheckpoint, init_args: ' \
               '{save_last: true, every_n_train_steps: 1, save_on_exception: true}}]'
    with pytest.raises(FloatingPointError) as error:
        cli(tmp_path, "fit", "--model.lr=1e4", f"--trainer.callbacks={callback}", *QUIET)
    message = str(error.value)
    stopped = re.search(r"training stopped at step (\d+): the (gradient|loss) is not finite", message)
    assert stopped and int(stopped[1]) >= 1, message
    lr = f"{1e4 * (int(stopped[1]) + 1) / 5:.0e}"
    assert "gradient norm=nan" in message and f"learning rate: vision {lr}, projector {lr}, decoder {lr}" in message
    assert checkpoints(tmp_path)  # step 0's, written before the failure: the check below is not vacuous
    assert_all_finite(tmp_path)


def test_train_script_exits_non_zero_when_training_diverges(tmp_path):
    # The command: with lr=1e4 it trained on with a NaN loss, exited 0 and saved NaN weights as last.ckpt.
    proc = train_script(
        "fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={tmp_path}", "--model.lr=1e4", *QUIET
    )
    assert proc.returncode != 0
    assert re.search(r"FloatingPointError: training stopped at step [1-9]\d*: the (gradient|loss) is not finite",
                     proc.stderr)
    assert_all_finite(tmp_path)


def with_batches(data, edit):
    """``data`` whose training batches go through ``edit(batch)`` after collation."""
    collator = data.collator

    def edited(*args, **kwargs):
        collate = collator(*args, **kwargs)
        return lambda samples: edit(collate(samples))

    data.collator = edited
    return data


def test_a_nan_loss_stops_training_before_its_update(module, tmp_path):
    m = module()
    before = {k: v.clone() for k, v in m.state_dict().items()}

    def nan_images(batch):
        batch["images"] = torch.full_like(batch["images"], float("nan"))
        return batch

    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[PeriodicCheckpoint(save_last=True, every_n_train_steps=1, save_on_exception=True)],
    )
    with pytest.raises(FloatingPointError, match=r"step 0: the loss is not finite \(train/loss=nan, gradient norm=nan"):
        trainer.fit(m, datamodule=with_batches(tiny_data(m), nan_images))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # the NaN step changed nothing
    assert_all_finite(tmp_path)


class Poison(L.Callback):
    """Sets one weight to NaN after the optimizer step, where only the checkpoint's own check can catch it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            pl_module.model.projector.mlp[0].weight[0, 0] = float("nan")


def test_a_checkpoint_of_non_finite_weights_is_never_written(module, tmp_path):
    m = module()
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[Poison(), PeriodicCheckpoint(save_last=True, every_n_train_steps=1, save_on_exception=True)],
    )
    with pytest.raises(ValueError, match=r"refusing to write a training checkpoint: 1 of \d+ .*projector.mlp.0.weight"):
        trainer.fit(m, datamodule=tiny_data(m))
    assert not checkpoints(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# last.ckpt every N steps and at the end; SIGKILL and resume


def test_last_checkpoint_is_written_at_the_end_between_periodic_saves(tmp_path):
    # tiny.yaml saves every 10 steps; 13 steps end between two saves. Lightning's own ModelCheckpoint would leave
    # step 10's weights as last.ckpt.
    run = cli(tmp_path, "fit", *ONE_SAMPLE, "--trainer.max_steps=13", *QUIET)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 13
    final = run.model.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in last["state_dict"].items())


def test_sigkilled_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    killed, resumed, reference = tmp_path / "killed", tmp_path / "resumed", tmp_path / "reference"
    # A run far longer than the test, killed with SIGKILL as soon as its first periodic last.ckpt exists (the file
    # is written to a temporary name and renamed, so it is whole whenever it exists).
    proc = subprocess.Popen(
        [sys.executable, "scripts/train.py", "fit", "--config", "configs/tiny.yaml", *ONE_SAMPLE, *QUIET,
         "--trainer.max_steps=100000", f"--trainer.default_root_dir={killed}", "--trainer.enable_progress_bar=false"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 90
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert last.exists(), stderr[-3000:]
    k = torch.load(last, weights_only=True)["global_step"]
    assert k >= 10 and k % 10 == 0  # a periodic save (tiny.yaml: every 10 steps), not one at the end
    end = k + 5

    # Resumed in-process, to watch what it loads and how many steps it runs.
    loads, steps = [], []
    real_load, real_step = torch.load, MMGPTModule.training_step
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("weights_only")) or real_load(*a, **kw))
    monkeypatch.setattr(MMGPTModule, "training_step", lambda self, *a: steps.append(1) or real_step(self, *a))
    run = cli(resumed, "fit", *ONE_SAMPLE, *QUIET, f"--trainer.max_steps={end}", f"--ckpt_path={last}")
    monkeypatch.undo()
    assert loads and all(w is True for w in loads)  # every load of the checkpoint was weights_only=True
    assert len(steps) == end - k and run.trainer.global_step == end

    expected = cli(reference, "fit", *ONE_SAMPLE, *QUIET, f"--trainer.max_steps={end}")
    got, want = run.model.state_dict(), expected.model.state_dict()
    assert all(torch.equal(got[name], v) for name, v in want.items())
    # The optimizer and the schedule came back too (a fresh AdamW or a restarted warmup would give other weights).
    (got_opt,), (want_opt,) = run.trainer.optimizers, expected.trainer.optimizers
    assert [g["lr"] for g in got_opt.param_groups] == [g["lr"] for g in want_opt.param_groups]
    for p, q in zip(run.model.parameters(), expected.model.parameters(), strict=True):
        if p in got_opt.state:
            assert torch.equal(got_opt.state[p]["exp_avg_sq"], want_opt.state[q]["exp_avg_sq"])


# ---------------------------------------------------------------------------------------------------------
# train/skipped_samples


@pytest.mark.parametrize("skipped", [None, 3])
def test_skipped_samples_are_summed_over_the_epoch(module, tmp_path, skipped):
    m = module()

    def report(batch):
        if skipped is not None:
            batch["skipped"] = skipped  # what the collator reports under data.on_bad_sample: skip
        return batch

    data = with_batches(tiny_data(m), report)  # 2 scenes, 10 samples: 3 batches of up to 4
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(m, datamodule=data)
    assert trainer.num_training_batches == 3
    assert float(trainer.callback_metrics["train/skipped_samples"]) == 3 * (skipped or 0)
