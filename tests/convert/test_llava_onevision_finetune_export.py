"""LLaVA-OneVision: mmgpt -> HF export (an imported model written back loads in transformers with the original's
logits), the training batch (prompt ids and pixels the HF processor's, padded and packed), and a LoRA fine-tune of an
imported directory through the CLI (``model.init_from: HF_DIR``) exported back with mmgpt's logits."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml
from test_llava_onevision import (
    CHAT_TEMPLATE,
    CLOSE,
    PICTURES,
    G,
    hf_config,
    hf_processor,
    load_hf,
    picture,
    processor_path,
    save_model,
    tokenizer,  # noqa: F401 - the fixture
    user,
)
from transformers import AutoModelForImageTextToText, AutoProcessor

import mmgpt
from mmgpt.commands.convert import main as convert_main
from mmgpt.config import ProjectorConfig
from mmgpt.convert.hf_vlm import hf_vlm_family, load_model_tokenizer
from mmgpt.convert.llava_onevision import (
    export_llava_onevision,
    import_llava_onevision,
    load_llava_onevision_tokenizer,
)
from mmgpt.data.collate import IGNORE_INDEX, AnyresImages, Collator, image_seq_len_for
from mmgpt.data.datamodule import MMGPTDataModule
from mmgpt.data.sample import Sample
from mmgpt.models.anyres import AnyresImageProcessor
from mmgpt.train.cli import MMGPTCLI
from mmgpt.train.loss import next_token_targets, summed_next_token_loss
from mmgpt.train.module import MMGPTModule

QUESTION = "what is in this picture?"


def save_chat_model(path, tok, aspect: str = "anyres_max_2", **config):
    """A saved model whose processor carries the released models' chat template (pooling with anyres_max_2)."""
    processor = hf_processor(tok, aspect, chat_template=CHAT_TEMPLATE)
    return save_model(path, hf_config(tok, vision_aspect_ratio=aspect, **config), processor)


@pytest.fixture(scope="module")
def onevision(tmp_path_factory, tokenizer):  # noqa: F811
    return save_chat_model(tmp_path_factory.mktemp("onevision") / "m", tokenizer)


def _perturb_(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every weight a little, as training would: an export that dropped or swapped a tensor then differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def hf_inputs(processor, image, question: str = QUESTION) -> dict:
    text = processor.apply_chat_template(user(question, None), add_generation_prompt=True)
    return processor(text=text, images=image, return_tensors="pt")


# ---------------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize(
    "tie,layer", [(False, -1), (True, -2)], ids=["untied-last-layer", "tied-earlier-layer"]
)
def test_round_trip_equals_the_original(tmp_path, tokenizer, tie, layer):  # noqa: F811
    original = save_chat_model(tmp_path / "hf", tokenizer, tie_word_embeddings=tie, vision_feature_layer=layer)
    model = import_llava_onevision(original)
    tok = load_llava_onevision_tokenizer(original, model.config.image_token_id)
    export_llava_onevision(model, tok, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "llava_onevision" and saved["vision_aspect_ratio"] == "anyres_max_2"
    # The tower as mmgpt kept it, read at its last block: one block fewer when the original read an earlier one.
    assert saved["vision_config"]["num_hidden_layers"] == 2 + layer + 1 and saved["vision_feature_layer"] == -1
    hf, theirs = load_hf(original), load_hf(tmp_path / "out")
    processor = processor_path(original)
    for name in ("wide", "tall", "square"):
        inputs = hf_inputs(processor, PICTURES[name]())
        with torch.no_grad():
            torch.testing.assert_close(theirs(**inputs).logits, hf(**inputs).logits, atol=1e-5, rtol=1e-5)
    # The written processor tiles, counts and renders prompts (chat template included) as the original.
    written = AutoProcessor.from_pretrained(str(tmp_path / "out"))
    assert written.chat_template == CHAT_TEMPLATE
    image = PICTURES["odd"]()
    again, inputs = hf_inputs(written, image), hf_inputs(processor, image)
    for key in ("input_ids", "pixel_values", "image_sizes"):
        assert torch.equal(again[key], inputs[key]), key
    # And mmgpt reads the export as it read the original.
    reloaded = import_llava_onevision(tmp_path / "out")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert load_llava_onevision_tokenizer(tmp_path / "out").chat_template == CHAT_TEMPLATE


def test_changed_weights_export_with_mmgpt_logits(tmp_path, onevision):
    model = import_llava_onevision(onevision)
    _perturb_(model)
    export_llava_onevision(model, load_llava_onevision_tokenizer(onevision), tmp_path / "out")
    theirs = load_hf(tmp_path / "out")
    processor = processor_path(onevision)
    for name in ("wide", "small"):
        image = PICTURES[name]()
        inputs = hf_inputs(processor, image)
        with torch.no_grad():
            ours = model(inputs.input_ids, [model.processor(image)])
            torch.testing.assert_close(theirs(**inputs).logits, ours, **CLOSE)


def test_export_names_what_does_not_fit(tmp_path, onevision):
    model = import_llava_onevision(onevision)
    tok = load_llava_onevision_tokenizer(onevision)
    changed = import_llava_onevision(onevision)
    changed.config = changed.config.replace(projector=ProjectorConfig(mlp_depth=1, input_norm=True))
    with pytest.raises(ValueError, match=r"does not fit LLaVA-OneVision's architecture: projector: .*mlp_depth=1"):
        export_llava_onevision(changed, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(ValueError, match=r"the tokenizer's <image> is id None"):
        export_llava_onevision(model, _without_image(tok), tmp_path / "out")


def _without_image(tok):
    """A tokenizer whose vocabulary lacks ``<image>`` (another model's)."""

    class Other:
        chat_template = tok.chat_template

        def get_vocab(self):
            return {k: v for k, v in tok.get_vocab().items() if k != "<image>"}

    return Other()


def test_convert_command_imports_and_exports(tmp_path, onevision, capsys):
    convert_main(["llava-onevision", "import", str(onevision), str(tmp_path / "mm")])
    convert_main(["llava-onevision", "export", str(tmp_path / "mm"), str(tmp_path / "hf")])
    assert f"exported {tmp_path / 'mm'} to {tmp_path / 'hf'}" in capsys.readouterr().out
    expected, written = load_hf(onevision).state_dict(), load_hf(tmp_path / "hf").state_dict()
    for key, value in expected.items():
        if "post_layernorm" not in key:  # never read by LLaVA-OneVision: written as the identity
            assert torch.equal(written[key], value), key
    # Another family's export names what does not fit.
    with pytest.raises(SystemExit) as error:
        convert_main(["paligemma", "export", str(tmp_path / "mm"), str(tmp_path / "x")])
    assert error.value.code == 2 and "does not fit PaliGemma's architecture" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The training batch of an anyres model


def test_collator_writes_each_pictures_count_as_the_hf_processor(onevision):
    model, tok = import_llava_onevision(onevision), load_model_tokenizer(onevision)
    assert hf_vlm_family(onevision) == "llava_onevision" and tok.chat_template == CHAT_TEMPLATE
    assert isinstance(model.processor, AnyresImageProcessor) and image_seq_len_for(model) == 0
    processor = processor_path(onevision)
    pictures = [PICTURES[name]() for name in ("wide", "tall", "small", "square")]
    samples = [Sample(prompt=QUESTION, target="", image=p, id=str(k)) for k, p in enumerate(pictures)]
    samples.append(Sample(prompt="what is red?", target="", id="text"))
    batch = Collator(tok, model.processor, 0, 512, mode="generate")(samples)
    assert isinstance(batch["images"], AnyresImages) and len(batch["images"]) == len(pictures)
    for k, image in enumerate(pictures):
        # Each picture's row is the HF processor's prompt (left-padded to the batch), its tiles the HF pixels.
        row = batch["input_ids"][k][batch["attention_mask"][k].bool()]
        inputs = hf_inputs(processor, image)
        assert torch.equal(row, inputs.input_ids[0]), k
        assert torch.equal(batch["images"][k].pixels, inputs.pixel_values[0, : batch["images"][k].pixels.size(0)])
    counts = {int((row == model.config.image_token_id).sum()) for row in batch["input_ids"][:4]}
    assert len(counts) > 1  # pictures of different sizes take different counts

    # Training rows: the prompt as generation gives it, then the answer and the end of the turn; padded and packed
    # batches give every sample the same loss.
    samples = [Sample(prompt=QUESTION, target="a red circle", image=pictures[0], id="a"),
               Sample(prompt="what is red?", target="the circle", id="b"),
               Sample(prompt="what is here?", target="blue", image=pictures[2], id="c")]
    padded = Collator(tok, model.processor, 0, 512)(samples)
    prompt = hf_inputs(processor, pictures[0]).input_ids[0]
    row, labels = padded["input_ids"][0], padded["labels"][0]
    n = prompt.size(0)
    assert torch.equal(row[:n], prompt) and int(padded["prefix_lengths"][0]) == n
    answer = tok("a red circle<|im_end|>\n", add_special_tokens=False).input_ids
    assert row[n : n + len(answer)].tolist() == answer and labels[n : n + len(answer)].tolist() == answer
    assert (labels[:n] == IGNORE_INDEX).all()
    packed = Collator(tok, model.processor, 0, 512, pack=True)(samples)
    assert packed["input_ids"].size(0) < len(samples) and len(packed["images"]) == 2
    with torch.no_grad():
        losses = []
        for batch in (padded, packed):
            model.check_inputs(batch["input_ids"], batch["images"], batch.get("position_ids"))
            is_target, logits_at = next_token_targets(batch["labels"])
            logits = model(batch["input_ids"], batch["images"].to("cpu"), position_ids=batch.get("position_ids"),
                           segment_ids=batch.get("segment_ids"), logits_at=logits_at)
            losses.append(summed_next_token_loss(logits, batch["labels"], is_target, "sample",
                                                 segment_ids=batch.get("segment_ids"), num_samples=len(samples)))
    torch.testing.assert_close(losses[0], losses[1], **CLOSE)


def test_batch_pictures_move_and_cast_as_lightning_moves_a_batch(onevision):
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning.pytorch.plugins.precision import HalfPrecision

    model, tok = import_llava_onevision(onevision), load_model_tokenizer(onevision)
    samples = [Sample(prompt=QUESTION, target="red", image=PICTURES["wide"](), id="a")]
    batch = Collator(tok, model.processor, 0, 512)(samples)
    moved = HalfPrecision("bf16-true").convert_input(move_data_to_device(batch, "cpu"))
    assert isinstance(moved["images"], AnyresImages) and moved["images"][0].pixels.dtype == torch.bfloat16
    assert moved["images"][0].size == batch["images"][0].size and batch["images"][0].pixels.dtype == torch.float32


def test_a_template_whose_turns_differ_otherwise_is_refused(onevision):
    from mmgpt.prompts import encode_conversation

    tok = load_model_tokenizer(onevision)
    messages = [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "red"}]
    ids, supervised, turns = encode_conversation(tok, messages, 0, image_texts=["<image>"])
    assert tok.decode([t for t, s in zip(ids, supervised, strict=True) if s]) == "red<|im_end|>\n"
    assert tok.decode(ids[: turns[0][0]]).endswith("<|im_start|>assistant\n")
    # An assistant turn that begins with another word than the generation prompt cannot be located (a new
    # tokenizer: encodings are remembered per tokenizer object).
    tok = load_model_tokenizer(onevision)
    tok.chat_template = CHAT_TEMPLATE.replace("message['role'] + ' '", "message['role'] + 'X'")
    with pytest.raises(ValueError, match="renders a conversation differently from its own beginning"):
        encode_conversation(tok, messages, 0, image_texts=["<image>"])


# ---------------------------------------------------------------------------------------------------------
# Fine-tune, then export

STEPS = 20
# A LoRA fine-tune on the shapes data: no architecture anywhere, it comes from init_from.
FINETUNE = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu", "max_steps": STEPS, "limit_val_batches": 1, "val_check_interval": STEPS,
        "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
    },
    "model": {
        "lr": 0.01, "warmup_steps": 2, "eval_every_n_validations": 1, "eval_samples": 2, "max_new_tokens": 4,
        "lora": {"r": 8, "alpha": 16, "dropout": 0},
    },
    "data": {
        # 64 px pictures: 2x2 tiles, pooled to anyres_max_2's size.
        "batch_size": 8, "max_length": 256, "shapes": {"image_size": 64},
        "train": [{"kind": "shapes", "size": 40}], "val": [{"kind": "shapes", "size": 4}],
    },
}


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


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_lora_finetune_of_an_imported_model_exports_to_hf(tmp_path, onevision, packing):
    original = mmgpt.load(onevision).model
    run = finetune(tmp_path, onevision, f"--data.packing={str(packing).lower()}")
    assert run.trainer.global_step == STEPS
    # The data was tokenized with the model's own tokenizer and chat template, and counted by its processor.
    assert run.datamodule.tokenizer_path == str(onevision)
    assert run.model.tokenizer.chat_template == CHAT_TEMPLATE and run.datamodule.image_seq_len == 0
    losses = logged_losses(run)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert all(math.isfinite(x) for x in losses) and last < first - 1.0, losses
    print(f"loss {first:.3f} -> {last:.3f} ({'packed' if packing else 'padded'})")
    # Only the adapters trained: the tower, projector and newline were frozen, the LM's base too.
    trained = run.model.model.state_dict()
    for name, value in original.state_dict().items():
        assert torch.equal(trained[name if name in trained else _lora_base(name, trained)], value), name

    (ckpt,) = (tmp_path / "lightning_logs").glob("*/checkpoints/*.ckpt")
    convert_main(["llava-onevision", "export", str(ckpt), str(tmp_path / "out")])
    hf = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out")).eval()
    hf_proc = AutoProcessor.from_pretrained(str(tmp_path / "out"))
    merged = mmgpt.load(ckpt).model.eval()
    image = picture(70, 40)
    inputs = hf_inputs(hf_proc, image, "Describe the image.")
    with torch.no_grad():
        ours = merged(inputs.input_ids, [merged.processor(image)])
        theirs = hf(**inputs).logits
        torch.testing.assert_close(theirs, ours, **CLOSE)
        # The fine-tune is in the export: it differs from the original.
        before = AutoModelForImageTextToText.from_pretrained(str(onevision))(**inputs).logits
        assert not torch.allclose(theirs, before, atol=1e-2)


def _lora_base(name: str, state: dict) -> str:
    # peft moved an adapted Linear's weight to <module>.base_layer.weight.
    module, _, leaf = name.rpartition(".")
    key = f"{module}.base_layer.{leaf}"
    assert key in state, name
    return key


def test_processor_counts_only_with_the_models_layout(onevision):
    model = import_llava_onevision(onevision)
    image = model.processor(PICTURES["wide"]())
    assert model.processor.num_tokens(image) == model.num_image_tokens(image) > G * G
    bare = AnyresImageProcessor(**{k: v for k, v in model.processor.to_dict().items()})
    assert bare == model.processor and "layout" not in bare.to_dict()
    with pytest.raises(ValueError, match=r"has no layout, so it cannot count .* use the model's processor"):
        bare.num_tokens(image)
