"""The training system: optimizer groups, per-component learning rates, freezing, the schedule, and the CLI."""

from __future__ import annotations

import math
import re

import lightning as L
import pytest
import torch
import yaml
from conftest import TINY_YAML, cli, tiny_data, train_script

import mmgpt
from mmgpt.data.datamodule import MMGPTDataModule
from mmgpt.train.cli import MMGPTCLI
from mmgpt.train.module import MMGPTModule


def attach_trainer(m: MMGPTModule, max_steps: int) -> None:
    # max_epochs=-1 makes estimated_stepping_batches == max_steps without building a dataloader.
    m.trainer = L.Trainer(max_epochs=-1, max_steps=max_steps, accelerator="cpu", logger=False)


# ---------------------------------------------------------------------------------------------------------
# Optimizer


@pytest.mark.parametrize("tie", [True, False])
def test_param_groups_decay_and_lr(module, tie):
    lrs = dict(vision_lr=1e-4, projector_lr=2e-3, decoder_lr=3e-4)
    m = module(decoder=dict(tie_embeddings=tie), lr=9e-9, weight_decay=0.05, **lrs)
    attach_trainer(m, max_steps=10)
    optimizer = m.configure_optimizers()["optimizer"]
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    named = dict(m.model.named_parameters())  # tied lm_head/wte appear once
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(where) == len(named)  # each exactly once

    no_decay = {
        "vision.model.cls_token", "vision.model.pos_embed",  # timm embeddings that are not nn.Embedding
        "decoder.wte.weight",
    }
    no_decay |= {n for n, p in named.items() if n.endswith(("norm.weight", "norm1.weight", "norm2.weight", ".bias"))}
    no_decay |= {n for n in named if re.fullmatch(r"decoder\.(h\.\d+\.norm_[12]|ln_f)\.weight", n)}
    for name, p in named.items():
        group = where[id(p)]
        component = name.split(".")[0]
        assert group["initial_lr"] == lrs[f"{component}_lr"], name
        expected_decay = 0.0 if name in no_decay else 0.05
        assert group["weight_decay"] == expected_decay, name
        if expected_decay:
            assert p.ndim == 2 or name == "vision.model.patch_embed.proj.weight", name  # matrices (conv kernel)
    assert where[id(named["decoder.h.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert where[id(named["projector.mlp.0.weight"])]["weight_decay"] == 0.05
    if not tie:
        assert where[id(named["decoder.lm_head.weight"])]["weight_decay"] == 0.05  # an output matrix decays


def test_component_without_lr_uses_base_lr(module):
    m = module(lr=7e-4, projector_lr=1e-2)
    attach_trainer(m, max_steps=10)
    groups = {g["name"]: g["initial_lr"] for g in m.configure_optimizers()["optimizer"].param_groups}
    assert groups == {
        "vision": 7e-4, "vision_no_decay": 7e-4, "projector": 1e-2, "projector_no_decay": 1e-2,
        "decoder": 7e-4, "decoder_no_decay": 7e-4,
    }


def test_warmup_cosine_schedule(module):
    m = module(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    total = 20
    attach_trainer(m, max_steps=total)
    opt = m.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert opt["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: a no-op that keeps the scheduler from warning
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3 / 4)  # the first step already learns, at 1/warmup of the peak
    assert lrs[3] == pytest.approx(1e-3)  # end of warmup: the peak
    assert lrs[4] == pytest.approx(1e-3)  # cosine starts at the peak
    assert lrs[12] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way down the cosine
    # The last of the 20 steps (index 19) is one step short of the floor, reached at index 20.
    assert lrs[19] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 15 / 16))))
    assert lrs[20] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # monotone decay after warmup


def test_lr_decay_steps_cuts_a_longer_schedule_short(module):
    # A 10-step run on a 20-step schedule follows the 20-step run's rates for its 10 steps.
    rates = []
    for kwargs, steps in (({}, 20), ({"lr_decay_steps": 20}, 10)):
        m = module(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1, **kwargs)
        attach_trainer(m, max_steps=steps)
        lam = m.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
        rates.append([lam(s) for s in range(10)])
    assert rates[1] == pytest.approx(rates[0])
    assert rates[1][-1] > 0.5  # still high: without lr_decay_steps step 9 of 10 would be near the floor
    with pytest.raises(ValueError, match="lr_decay_steps=-3"):
        module(lr_decay_steps=-3)  # at construction, before any model is trained


def test_warmup_is_capped_at_half_the_run(module):
    m = module(lr=1e-3, warmup_steps=100)
    attach_trainer(m, max_steps=10)
    scheduler = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    lam = scheduler.lr_lambdas[0]
    assert [lam(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_freezing_trains_only_the_projector(module, tmp_path):
    m = module(freeze_vision=True, freeze_decoder=True, lr=1e-2, warmup_steps=1)
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(m, datamodule=tiny_data(m))
    assert trainer.global_step == 1
    changed = {k for k, v in m.model.state_dict().items() if not torch.equal(v, before[k])}
    projector = {k for k in before if k.startswith("projector.")}
    assert changed == projector  # every projector tensor moved, nothing else did
    assert {g["name"] for g in trainer.optimizers[0].param_groups} == {"projector", "projector_no_decay"}


def test_everything_frozen_raises(module):
    m = module(freeze_vision=True, freeze_projector=True, freeze_decoder=True)
    attach_trainer(m, max_steps=10)
    with pytest.raises(ValueError, match="every component is frozen"):
        m.configure_optimizers()


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_train_script_fast_dev_run(tmp_path, tokenizer):
    proc = train_script(
        "fit", "--config", "configs/tiny.yaml", "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    losses = re.findall(r"train/loss[:=]\s*([-+.\w]+)", output)
    assert losses, output[-3000:]
    assert all(math.isfinite(float(x)) for x in losses)
    # An untrained model is near-uniform over the vocabulary: the first loss is close to ln(vocab).
    assert abs(float(losses[-1]) - math.log(len(tokenizer))) < 1.5


def test_print_config_is_yaml(capsys):
    with pytest.raises(SystemExit) as exit_info:
        MMGPTCLI(MMGPTModule, MMGPTDataModule, args=["fit", "--config", str(TINY_YAML), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["vision"]["name"] == "vit_tiny_patch16_224"
    assert config["model"]["decoder"]["n_query_groups"] == 2
    # The tokenizer is set once, under data, and linked into the model rather than repeated.
    assert config["data"]["tokenizer"].endswith("tokenizer") and "tokenizer" not in config["model"]


def test_validate_test_predict_from_checkpoint(trained, tmp_path):
    trained_module, ckpt = trained
    expected = trained_module.model.state_dict()

    run = cli(tmp_path, "validate", f"--ckpt_path={ckpt}")
    loaded = run.model.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())  # the checkpoint's weights were used
    assert math.isfinite(float(run.trainer.callback_metrics["val/loss"]))

    run = cli(tmp_path, "test", f"--ckpt_path={ckpt}", "--trainer.limit_test_batches=1")
    assert math.isfinite(float(run.trainer.callback_metrics["test/loss"]))

    run = cli(tmp_path, "predict", f"--ckpt_path={ckpt}", "--trainer.limit_predict_batches=1")
    rows = [row for batch in run.trainer.predict_loop.predictions for row in batch]
    assert len(rows) == run.datamodule.batch_size  # one batch
    assert all(isinstance(r["prediction"], str) and r["id"].startswith("shapes/test/") for r in rows)


def test_fit_in_process_logs_finite_loss(tmp_path):
    run = cli(tmp_path, "fit", "--trainer.fast_dev_run=true")
    assert run.trainer.global_step == 1
    assert math.isfinite(float(run.trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(run.trainer.callback_metrics["val/loss"]))


# ---------------------------------------------------------------------------------------------------------
# Training stages: LoRA and init_from


def one_step(m: MMGPTModule, tmp_path, checkpoint: bool = False) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=checkpoint, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(m, datamodule=tiny_data(m))
    return trainer


def test_lora_trains_only_adapters_and_merges_exactly(module, tmp_path):
    from mmgpt.models.lora import LoRAConfig

    m = module(freeze_vision=True, freeze_projector=True, lora=LoRAConfig(r=4, alpha=8, dropout=0.0), lr=1e-2)
    trainable = {n for n, p in m.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # Every linear layer of the decoder but the (tied) head is adapted: q/k/v, attention output, MLP in and out.
    adapted = {n.split(".lora_")[0].split(".", 3)[-1] for n in trainable}
    assert adapted == {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"}
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    one_step(m, tmp_path, checkpoint=True)
    changed = {k for k, v in m.model.state_dict().items() if not torch.equal(v, before[k])}
    # The adapters move (B from its zero init), the base weights do not.
    assert changed == {k for k in before if "lora_" in k}
    # A checkpoint trained with LoRA loads as a plain model with the adapters merged: the same logits.
    m.eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    expected = m.model(ids)
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    loaded = mmgpt.load(ckpt)
    assert not any("lora" in k for k in loaded.model.state_dict())
    torch.testing.assert_close(loaded.model(ids), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(loaded.model(ids), module()(ids), atol=1e-4)  # the adapters did change the model


def test_lora_with_frozen_decoder_is_an_error(module):
    from mmgpt.models.lora import LoRAConfig

    with pytest.raises(ValueError, match="cannot be combined with freeze_decoder"):
        module(freeze_decoder=True, lora=LoRAConfig())


def test_second_stage_starts_from_the_first(module, tmp_path):
    stage1 = module(freeze_vision=True, freeze_decoder=True, lr=1e-2)
    one_step(stage1, tmp_path, checkpoint=True)
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    torch.manual_seed(123)  # a different init, which init_from must overwrite
    stage2 = module(init_from=str(ckpt), freeze_vision=True)
    for (name, a), b in zip(stage1.model.state_dict().items(), stage2.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="init_from=.*do not fit"):
        module(init_from=str(ckpt), decoder={"n_layer": 3})


def test_sample_loss_weighting_gives_every_sample_an_equal_say(module):
    m = module()
    data = tiny_data(m)
    batch = data.collator("train")([data.dataset("train")[i] for i in range(6)])
    with torch.no_grad():
        token_total, tokens = m.summed_loss(batch, per="token")
        sample_total, samples = m.summed_loss(batch, per="sample")
        logits = m.model(batch["input_ids"], batch["images"])
    labels = batch["labels"][:, 1:]
    per_row = []
    for i in range(labels.size(0)):
        keep = labels[i] != -100
        per_row.append(torch.nn.functional.cross_entropy(logits[i, :-1][keep], labels[i][keep]))
    assert int(samples) == labels.size(0) and int(tokens) == int((labels != -100).sum())
    torch.testing.assert_close(sample_total, torch.stack(per_row).sum())
    torch.testing.assert_close(token_total / tokens, m.loss(batch)[0])
    assert len({int((row != -100).sum()) for row in labels}) > 1  # rows of different lengths: the modes differ
    assert not torch.allclose(sample_total / samples, token_total / tokens)
    with pytest.raises(ValueError, match="loss_weighting='row'"):
        module(loss_weighting="row")


def test_compiled_training_forward_equals_eager(module):
    # model.compile: training steps run a torch.compile'd forward; it must give the eager loss and gradients, and
    # leave the checkpoint layout alone (parameters registered once, under model.).
    eager, compiled = module(), module(compile=True)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    data = tiny_data(eager)
    data.packing = True
    batch = next(iter(data.train_dataloader()))
    results = []
    for m in (eager, compiled):
        m.train()
        total, units = m.summed_loss(batch)
        (total / units).backward()
        results.append((total.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-4, rtol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, g in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], g, atol=1e-5, rtol=1e-3, msg=name)
    assert compiled._train_forward is not None and eager._train_forward is None  # really the compiled path
