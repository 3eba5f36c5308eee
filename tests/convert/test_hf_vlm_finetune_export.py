"""Fine-tune an imported HF SmolVLM or PaliGemma with LoRA through the CLI (``model.init_from: HF_DIR``), then export
it back: the loss falls, the tower stays frozen, and the merged export loads in transformers with mmgpt's logits."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import yaml
from test_idefics3 import (
    chat,
    hf_processor,
    picture,
    save_model,
    tokenizer,  # noqa: F401 - the fixture
)
from test_idefics3 import hf_config as idefics3_config
from test_paligemma import hf_config as paligemma_config
from test_paligemma import processor  # noqa: F401 - the fixture
from test_paligemma import save_model as save_paligemma
from transformers import AutoModelForImageTextToText, AutoProcessor

import mmgpt
from mmgpt.commands.convert import main as convert_main
from mmgpt.config import DecoderConfig
from mmgpt.convert.idefics3 import import_idefics3, load_idefics3_tokenizer
from mmgpt.data.collate import Collator
from mmgpt.data.datamodule import MMGPTDataModule
from mmgpt.data.sample import Sample
from mmgpt.prompts import IMAGE
from mmgpt.train.cli import MMGPTCLI
from mmgpt.train.module import MMGPTModule

STEPS = 20
# A LoRA fine-tune on the shapes data: no architecture anywhere, it comes from init_from.
FINETUNE = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu", "max_steps": STEPS, "limit_val_batches": 1, "val_check_interval": STEPS,
        "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
    },
    "model": {
        "lr": 0.01, "warmup_steps": 2, "eval_every_n_validations": 0, "lora": {"r": 8, "alpha": 16, "dropout": 0},
    },
    "data": {
        "batch_size": 8, "max_length": 256, "shapes": {"image_size": 32},
        "train": [{"kind": "shapes", "size": 40}], "val": [{"kind": "shapes", "size": 4}],
    },
}


@pytest.fixture
def smolvlm(tmp_path, tokenizer):  # noqa: F811
    return save_model(tmp_path / "smolvlm", idefics3_config(tokenizer, "smolvlm"), tokenizer)


@pytest.fixture
def paligemma(tmp_path, processor):  # noqa: F811
    return save_paligemma(tmp_path / "paligemma", paligemma_config(processor), processor)


def finetune(tmp_path, hf_dir, *args: str) -> MMGPTCLI:
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump(FINETUNE))
    logger = ("--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}")
    return MMGPTCLI(
        MMGPTModule, MMGPTDataModule, save_config_kwargs={"overwrite": True},
        args=["fit", "--config", str(config), f"--model.init_from={hf_dir}", f"--trainer.default_root_dir={tmp_path}",
              *logger, *args],
    )


def logged_losses(run: MMGPTCLI) -> list[float]:
    with open(f"{run.trainer.logger.log_dir}/metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


# ---------------------------------------------------------------------------------------------------------
# The training batch of a tiling model


def test_collator_tiles_pictures_as_the_hf_processor(smolvlm, tokenizer):  # noqa: F811
    model = import_idefics3(smolvlm)
    tok = load_idefics3_tokenizer(smolvlm)
    samples = [Sample(prompt="What is in this image?", target="", image=picture(80, 50), id="a"),
               Sample(prompt="Describe the picture", target="", id="b")]
    batch = Collator(tok, model.processor, model.image_seq_len, 256, mode="generate")(samples)
    hf = hf_processor(tokenizer)
    inputs = hf(text=chat(hf, 1), images=[picture(80, 50)], return_tensors="pt")
    # The picture's row is the HF processor's prompt (left-padded to the batch), its images the tiles and global view.
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert torch.equal(row, inputs.input_ids[0])
    assert torch.equal(batch["images"], inputs.pixel_values[0])  # (7, 3, 32, 32): 2 x 3 tiles + the global view
    # Training rows (and packed ones) splice the same images in the same order.
    samples = [Sample(prompt="What is in this image?", target="a red circle", image=picture(80, 50), id="a"),
               Sample(prompt="Describe the picture", target="two squares", id="b"),
               Sample(prompt="What is here?", target="blue", image=picture(30, 30, seed=2), id="c")]
    for pack in (False, True):
        batch = Collator(tok, model.processor, model.image_seq_len, 256, pack=pack)(samples)
        assert batch["images"].shape[0] == 7 + 10  # the square picture is enlarged to 96 px: 3 x 3 tiles + global
        model.check_image_tokens(batch["input_ids"], batch["images"].shape[0])


# ---------------------------------------------------------------------------------------------------------
# Fine-tune, then export


@pytest.mark.parametrize("family", ["smolvlm", "paligemma"])
def test_lora_finetune_of_an_imported_model_exports_to_hf(tmp_path, request, family):
    hf_dir = request.getfixturevalue(family)
    original = mmgpt.load(hf_dir).model
    run = finetune(tmp_path, hf_dir)
    assert run.trainer.global_step == STEPS
    # The data was tokenized with the model's own tokenizer and prompt format.
    assert run.datamodule.tokenizer_path == str(hf_dir) and run.model.tokenizer.chat_template is not None
    losses = logged_losses(run)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert all(math.isfinite(x) for x in losses) and last < first - 1.0, losses
    # Only the adapters trained: the tower and projector were frozen (as HF's recipes keep them), the LM's base too.
    trained = run.model.model.state_dict()
    for name, value in original.state_dict().items():
        assert torch.equal(trained[name if name in trained else _lora_base(name, trained)], value), name

    (ckpt,) = (tmp_path / "lightning_logs").glob("*/checkpoints/*.ckpt")
    convert_main([family, "export", str(ckpt), str(tmp_path / "out")])
    hf = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out")).eval()
    hf_proc = AutoProcessor.from_pretrained(str(tmp_path / "out"))
    merged = mmgpt.load(ckpt).model.eval()
    image = picture(40, 30)
    with torch.no_grad():
        if family == "smolvlm":
            inputs = hf_proc(text=chat(hf_proc, 1, "Describe the image."), images=[image], return_tensors="pt")
            ours = merged(inputs.input_ids, inputs.pixel_values[0])
        else:
            inputs = hf_proc(text=IMAGE + "caption en", images=image, suffix="a red circle", return_tensors="pt")
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            prefix_lengths = (inputs["token_type_ids"] == 0).sum(1)
            ours = merged(inputs["input_ids"], inputs["pixel_values"], prefix_lengths=prefix_lengths)
        theirs = hf(**inputs).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
        # The fine-tune is in the export: it differs from the original.
        assert not torch.allclose(theirs, AutoModelForImageTextToText.from_pretrained(str(hf_dir))(**inputs).logits,
                                  atol=1e-2)


def _lora_base(name: str, state: dict) -> str:
    # peft moved an adapted Linear's weight to <module>.base_layer.weight.
    module, _, leaf = name.rpartition(".")
    key = f"{module}.base_layer.{leaf}"
    assert key in state, name
    return key


# ---------------------------------------------------------------------------------------------------------
# What a fine-tune from an HF directory refuses, and what it allows


def test_an_imported_model_takes_no_architecture_and_no_other_tokenizer(smolvlm):
    with pytest.raises(ValueError, match=r"defines the architecture; model.decoder is set"):
        MMGPTModule(init_from=str(smolvlm), decoder=DecoderConfig(n_layer=3))
    with pytest.raises(ValueError, match=r"its own tokenizer, but data.tokenizer=elsewhere"):
        MMGPTModule(init_from=str(smolvlm), tokenizer="elsewhere")
    # The tower and projector train when asked to; by default they are frozen.
    assert MMGPTModule(init_from=str(smolvlm)).frozen == {"vision": True, "projector": True, "decoder": False}
    module = MMGPTModule(init_from=str(smolvlm), freeze_vision=False, freeze_projector=False)
    assert {g["name"] for g in module._param_groups()} >= {"vision", "projector", "decoder"}
