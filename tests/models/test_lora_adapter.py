"""LoRA adapters on their own, as peft saves them: save and load round trips, peft's own ``save_pretrained`` as the
oracle of the files, the plain transformers LM taking an adapter trained inside mmgpt, bad inputs, and an adapter
exported from a training checkpoint."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_PROJECTOR, TINY_VISION, tiny_data
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import mmgpt
from mmgpt.checkpoint import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    export_lora_adapter,
    load_exported,
    load_lora_adapter,
    save_exported,
    save_lora_adapter,
)
from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.factory import create_model
from mmgpt.models.lora import LoRAConfig, apply_lora, has_lora, lora_target_modules, merge_lora
from mmgpt.models.mmgpt import MMGPT
from mmgpt.prompts import IMAGE

# (B, T), text only (no <image>, id 3): the adapters are in the decoder.
IDS = torch.tensor([[1, 50, 60, 70, 80, 90], [7, 40, 100, 110, 120, 2]])
LORA = LoRAConfig(r=4, alpha=8, dropout=0.0)


def with_adapter(model: MMGPT, seed: int = 1) -> MMGPT:
    """``model`` with LoRA adapters whose B is random: at peft's zero init they would change nothing."""
    apply_lora(model.decoder, LORA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=g)
    return model.eval()


@dataclass
class Case:
    base: MMGPT  # without adapters
    adapted: MMGPT  # the same weights plus adapters
    task_type: str | None
    hf_dir: Path | None = None  # the transformers LM on disk (decoder.backend: hf)

    def plain(self) -> torch.nn.Module:
        """The base decoder as peft sees it outside mmgpt: the transformers LM loaded by transformers, or the native
        decoder module."""
        if self.hf_dir is None:
            return copy.deepcopy(self.base.decoder)
        return AutoModelForCausalLM.from_pretrained(str(self.hf_dir)).eval()


def hf_base(tokenizer, tmp_path: Path) -> tuple[MMGPT, Path]:
    """A tiny random Llama with O(1) weights on disk, as an mmgpt model's decoder (``decoder.hf_path``)."""
    lm = tmp_path / "lm"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    ))
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.5)
    hf.save_pretrained(lm)
    config = MMGPTConfig(
        VisionConfig(**TINY_VISION), ProjectorConfig(**TINY_PROJECTOR),
        DecoderConfig(vocab_size=len(tokenizer), hf_path=str(lm)),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    return create_model(config, pretrained=True).eval(), lm


@pytest.fixture(params=["native", "hf"])
def case(request, lively, tokenizer, tmp_path) -> Case:
    if request.param == "native":
        return Case(lively, with_adapter(copy.deepcopy(lively)), task_type=None)
    base, lm = hf_base(tokenizer, tmp_path)
    return Case(base, with_adapter(copy.deepcopy(base)), task_type="CAUSAL_LM", hf_dir=lm)


def requires_grad(model: torch.nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------------
# Round trips


def test_saved_adapter_loads_onto_a_fresh_base(case, tmp_path):
    expected = case.adapted(IDS)
    assert not torch.allclose(expected, case.base(IDS), atol=1e-3)  # the adapter does change the model
    out = save_lora_adapter(case.adapted, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    fresh = copy.deepcopy(case.base)
    assert load_lora_adapter(fresh, out) is fresh
    assert has_lora(fresh.decoder)  # not merged unless asked
    torch.testing.assert_close(fresh(IDS), expected)
    # The decoder alone is accepted too, for saving as for loading.
    save_lora_adapter(case.adapted.decoder, tmp_path / "from_decoder")
    again = copy.deepcopy(case.base)
    load_lora_adapter(again.decoder, tmp_path / "from_decoder")
    torch.testing.assert_close(again(IDS), expected)


def test_merged_load_equals_the_merged_export(case, tokenizer, tmp_path):
    save_lora_adapter(case.adapted, tmp_path / "adapter")
    merged = copy.deepcopy(case.adapted)
    merge_lora(merged.decoder)
    save_exported(merged, tokenizer, tmp_path / "export")
    exported, _ = load_exported(tmp_path / "export")

    fresh = copy.deepcopy(case.base)
    flags = requires_grad(fresh)
    load_lora_adapter(fresh, tmp_path / "adapter", merge=True)
    assert not has_lora(fresh) and not any("lora" in k for k in fresh.state_dict())
    assert requires_grad(fresh) == flags  # a plain model again, trainable where it was
    ours, theirs = fresh.state_dict(), exported.state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    # Folding B @ A into W rounds differently from adding the two products.
    torch.testing.assert_close(fresh(IDS), case.adapted(IDS), atol=1e-4, rtol=1e-4)
    # Merged, the model takes another adapter (here the same one a second time: twice the delta).
    load_lora_adapter(fresh, tmp_path / "adapter", merge=True)
    assert not torch.allclose(fresh(IDS), case.adapted(IDS), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# peft as the oracle


def test_files_are_what_peft_save_pretrained_writes(case, tmp_path):
    ours = save_lora_adapter(case.adapted, tmp_path / "ours")
    # peft's own PeftModel over the plain base, holding the very same adapter weights, saves the reference.
    plain = case.plain()
    targets = lora_target_modules(case.base.decoder)
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type=case.task_type)
    oracle = get_peft_model(plain, peft_config)
    adapted = case.adapted.decoder.model if case.hf_dir else case.adapted.decoder
    oracle.base_model.model.load_state_dict(adapted.state_dict())
    oracle.save_pretrained(str(tmp_path / "peft"))
    theirs = tmp_path / "peft"

    def config_json(directory: Path) -> dict:
        d = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
        return {**d, "target_modules": sorted(d["target_modules"])}  # a set in peft, listed in any order

    assert config_json(ours) == config_json(theirs)
    config = LoraConfig.from_pretrained(str(ours))
    assert (config.r, config.lora_alpha, config.lora_dropout, config.task_type) == (4, 8, 0.0, case.task_type)
    assert config.peft_type == "LORA" and config.target_modules == set(targets) and config.inference_mode
    assert config.base_model_name_or_path == (str(case.hf_dir) if case.hf_dir else None)

    reference = get_peft_model_state_dict(oracle)
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in reference)
    with safe_open(str(ours / ADAPTER_WEIGHTS_FILE), "pt") as f, \
            safe_open(str(theirs / ADAPTER_WEIGHTS_FILE), "pt") as g:
        assert f.metadata() == g.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(g.keys()) == set(reference)
        for k in reference:
            assert torch.equal(f.get_tensor(k), g.get_tensor(k)), k


def test_peft_loads_an_hf_adapter_onto_the_plain_transformers_lm(tokenizer, tmp_path):
    base, lm = hf_base(tokenizer, tmp_path)
    adapted = with_adapter(copy.deepcopy(base))
    out = save_lora_adapter(adapted, tmp_path / "adapter")
    expected = adapted.decoder(IDS)  # (B, T, vocab)
    plain = AutoModelForCausalLM.from_pretrained(str(lm)).eval()
    assert not torch.allclose(plain(input_ids=IDS).logits, expected, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(plain, str(out))(input_ids=IDS).logits, expected)
        # base_model_name_or_path is decoder.hf_path: peft finds the LM from the adapter alone.
        auto = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
        torch.testing.assert_close(auto(input_ids=IDS).logits, expected)


def test_an_adapter_saved_by_peft_loads_into_mmgpt(tokenizer, tmp_path):
    # The other way round: an adapter trained with peft on the plain LM goes on the mmgpt model built from it.
    base, lm = hf_base(tokenizer, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(str(lm)).eval()
    peft_model = get_peft_model(plain, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft_model.eval().save_pretrained(str(tmp_path / "peft"))
    load_lora_adapter(base, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(base.decoder(IDS), peft_model(input_ids=IDS).logits)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: what was wrong, and where


@pytest.fixture
def saved(lively, tmp_path) -> tuple[MMGPT, Path]:
    """The base model, and an adapter for it on disk."""
    return lively, save_lora_adapter(with_adapter(copy.deepcopy(lively)), tmp_path / "adapter")


def assert_untouched(model: MMGPT, logits: torch.Tensor, flags: dict[str, bool]) -> None:
    # A refused adapter leaves nothing behind: no LoRA layers, the same outputs and trainable parameters.
    assert not has_lora(model) and "peft_config" not in model.decoder.__dict__
    assert torch.equal(model(IDS), logits)
    assert requires_grad(model) == flags


def test_missing_files_and_urls_are_named(saved, tmp_path):
    base, out = saved
    with pytest.raises(ValueError, match=r"adapter='https://example.com/adapter' is a URL"):
        load_lora_adapter(base, "https://example.com/adapter")
    with pytest.raises(FileNotFoundError, match="no LoRA adapter directory at .*nowhere"):
        load_lora_adapter(base, tmp_path / "nowhere")
    (out / ADAPTER_WEIGHTS_FILE).rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match=f"{out} is not a LoRA adapter: {ADAPTER_WEIGHTS_FILE} is missing"):
        load_lora_adapter(base, out)
    # A pickle in its place is refused, not read.
    torch.save({}, out / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin, a pickle, which mmgpt does not read"):
        load_lora_adapter(base, out)
    (tmp_path / "weights").rename(out / ADAPTER_WEIGHTS_FILE)
    (out / ADAPTER_CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{ADAPTER_CONFIG_FILE} is missing"):
        load_lora_adapter(base, out)
    with pytest.raises(ValueError, match="ckpt_path='s3://bucket/run.ckpt' is a URL"):
        export_lora_adapter("s3://bucket/run.ckpt", tmp_path / "out")


def test_weights_that_do_not_fit_are_named(saved):
    base, out = saved
    logits, flags = base(IDS), requires_grad(base)
    weights = load_file(str(out / ADAPTER_WEIGHTS_FILE))
    dropped = "base_model.model.h.1.mlp.fc.lora_B.weight"
    extra = "base_model.model.h.1.mlp.gate.lora_A.weight"
    weights[extra] = weights.pop(dropped)
    save_file(weights, str(out / ADAPTER_WEIGHTS_FILE))
    with pytest.raises(ValueError, match=rf"LoRA adapter {out}: .*missing: {dropped}; unexpected: {extra}"):
        load_lora_adapter(base, out)
    assert_untouched(base, logits, flags)


def test_wrong_shapes_are_named(saved):
    base, out = saved
    logits, flags = base(IDS), requires_grad(base)
    config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps({**config, "r": 8}))  # the weights are rank 4
    with pytest.raises(ValueError, match=r"wrong shape: base_model.model.h.0.attn.proj.lora_A.weight \(4, 32\) "
                                         r"\(expected \(8, 32\)\)"):
        load_lora_adapter(base, out)
    assert_untouched(base, logits, flags)


def test_a_config_for_another_model_is_an_error(saved):
    base, out = saved
    logits, flags = base(IDS), requires_grad(base)
    config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(ValueError, match=rf"LoRA adapter {out}: .*q_proj"):
        load_lora_adapter(base, out)
    assert_untouched(base, logits, flags)
    (out / ADAPTER_CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{ADAPTER_CONFIG_FILE}: cannot read as a peft LoRA config"):
        load_lora_adapter(base, out)


def test_unreadable_or_nonfinite_weights_are_refused(saved, tmp_path):
    base, out = saved
    weights = load_file(str(out / ADAPTER_WEIGHTS_FILE))
    key = "base_model.model.h.0.attn.qkv.lora_B.weight"
    weights[key][0, 0] = float("nan")
    save_file(weights, str(out / ADAPTER_WEIGHTS_FILE))
    with pytest.raises(ValueError, match=rf"{ADAPTER_WEIGHTS_FILE}: 1 of {len(weights)} .* NaN or inf \({key}\)"):
        load_lora_adapter(base, out)
    (out / ADAPTER_WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"{ADAPTER_WEIGHTS_FILE}: cannot read as safetensors"):
        load_lora_adapter(base, out)
    # Nor is a diverged adapter saved: no directory that looks like an adapter is left.
    diverged = with_adapter(copy.deepcopy(base))
    with torch.no_grad():
        diverged.decoder.h[0].attn.qkv.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"cannot save the LoRA adapter .* \({key}\)"):
        save_lora_adapter(diverged, tmp_path / "diverged")
    assert not (tmp_path / "diverged").exists()


def test_adapters_must_exist_to_save_and_be_absent_to_load(saved, tmp_path):
    base, out = saved
    with pytest.raises(ValueError, match="the decoder has no LoRA adapters"):
        save_lora_adapter(base, tmp_path / "none")
    adapted = with_adapter(copy.deepcopy(base))
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        load_lora_adapter(adapted, out)


# ---------------------------------------------------------------------------------------------------------
# An adapter config is data from elsewhere: the fields that would do more than add A/B to the model's layers


def edit_config(out: Path, **fields) -> None:
    config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps({**config, **fields}))


def merged_state(base: MMGPT, out: Path) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base)
    load_lora_adapter(model, out, merge=True)
    return model.state_dict()


@pytest.fixture
def no_injection(monkeypatch) -> list:
    """Records every call of peft's ``inject_adapter_in_model`` (and lets it run)."""
    import peft

    calls, original = [], peft.inject_adapter_in_model
    monkeypatch.setattr(peft, "inject_adapter_in_model", lambda *a, **kw: calls.append(a) or original(*a, **kw))
    return calls


REFUSED_FIELDS = [
    ("layer_replication", [[0, 1], [0, 1]]),
    ("modules_to_save", ["lm_head"]),
    ("trainable_token_indices", [0, 1]),
    ("megatron_config", {"tensor_model_parallel_size": 1}),
    ("megatron_core", "os"),
    ("use_dora", True),
    ("bias", "all"),
    ("lora_bias", True),
    ("target_parameters", ["h.0.mlp.fc.weight"]),
]


@pytest.mark.parametrize("field, value", REFUSED_FIELDS, ids=[f for f, _ in REFUSED_FIELDS])
def test_config_fields_beyond_plain_lora_are_refused_before_the_model_is_touched(saved, no_injection, field, value):
    base, out = saved
    logits, flags = base(IDS), requires_grad(base)
    blocks = list(base.decoder.h)
    edit_config(out, **{field: value})
    with pytest.raises(ValueError, match=rf"LoRA adapter {out}: the adapter config sets {field}=.*which mmgpt does "
                                         r"not load"):
        load_lora_adapter(base, out)
    assert no_injection == []  # refused from the config alone: peft never saw the model
    assert_untouched(base, logits, flags)
    assert list(base.decoder.h) == blocks


def test_a_loftq_config_is_refused(saved, no_injection):
    # peft needs scipy to build a LoftQ config from a file: set on a config already built, as a caller could.
    from mmgpt.models.lora import load_lora_state_dict

    base, out = saved
    logits, flags = base(IDS), requires_grad(base)
    config = LoraConfig.from_pretrained(str(out))
    config.loftq_config = {"loftq_bits": 4}
    with pytest.raises(ValueError, match=r"sets loftq_config=\{'loftq_bits': 4\}, which mmgpt does not load"):
        load_lora_state_dict(base.decoder, config, load_file(str(out / ADAPTER_WEIGHTS_FILE)))
    assert no_injection == []
    assert_untouched(base, logits, flags)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "gaussian"])
def test_an_initialization_in_the_config_never_changes_what_loads(saved, init):
    # PiSSA and OLoRA rewrite the base weights as they initialize: the file's A/B must go on the weights as they are.
    base, out = saved
    expected = merged_state(base, out)
    edit_config(out, init_lora_weights=init)
    first, second = merged_state(base, out), merged_state(base, out)
    assert first.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(first[k], v) and torch.equal(second[k], v), k
    assert json.loads((out / ADAPTER_CONFIG_FILE).read_text())["init_lora_weights"] == init  # the file as it was


def test_rslora_scales_by_alpha_over_the_root_of_r(saved):
    base, out = saved
    edit_config(out, use_rslora=True)
    merged = merged_state(base, out)
    weights = load_file(str(out / ADAPTER_WEIGHTS_FILE))
    scale = LORA.alpha / LORA.r**0.5  # 8 / 2 = 4, where plain LoRA's alpha / r is 2
    a_keys = [k for k in weights if k.endswith("lora_A.weight")]
    assert a_keys
    for a_key in a_keys:
        module = a_key[len("base_model.model."): -len(".lora_A.weight")]
        delta = weights[a_key.replace("lora_A", "lora_B")] @ weights[a_key] * scale
        key = f"decoder.{module}.weight"
        torch.testing.assert_close(merged[key], base.state_dict()[key] + delta)


def test_any_failure_inside_peft_leaves_the_model_as_it_was(saved, monkeypatch):
    import peft

    import mmgpt.models.lora as lora

    base, out = saved
    logits, flags = base(IDS), requires_grad(base)
    modules = dict(base.named_modules())

    def fail(*args, **kwargs):
        raise KeyError("lm_head")

    monkeypatch.setattr(peft, "set_peft_model_state_dict", fail)
    with pytest.raises(ValueError, match=rf"LoRA adapter {out}: peft could not put the adapter on this decoder: "
                                         r"KeyError: 'lm_head'") as error:
        load_lora_adapter(base, out)
    assert isinstance(error.value.__cause__, KeyError)
    assert_untouched(base, logits, flags)
    assert dict(base.named_modules()) == modules  # the very same modules, each in its place

    # A wrapper other than a LoRA layer goes too: peft's ModulesToSaveWrapper around the head, had the check let
    # modules_to_save through.
    monkeypatch.setattr(lora, "check_loadable_config", lambda config: None)
    edit_config(out, modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match=rf"LoRA adapter {out}: "):
        load_lora_adapter(base, out)
    assert_untouched(base, logits, flags)
    assert dict(base.named_modules()) == modules


# ---------------------------------------------------------------------------------------------------------
# From a training checkpoint


def test_adapter_exported_from_a_training_checkpoint_reproduces_the_merged_model(module, tmp_path):
    m = module(freeze_vision=True, freeze_projector=True, lora=LORA, lr=1e-2)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(m, datamodule=tiny_data(m))
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    out = export_lora_adapter(ckpt, tmp_path / "adapter")
    config = LoraConfig.from_pretrained(str(out))
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 8, {"qkv", "proj", "fc"})
    assert config.base_model_name_or_path is None  # started from scratch: no init_from

    merged = mmgpt.load(ckpt).model  # the merged export
    # The model the run started from: the same seed, and training moved only the adapters.
    base = module().model.eval()
    with torch.no_grad():
        assert not torch.allclose(base(IDS), merged(IDS), atol=1e-4)
        load_lora_adapter(base, out, merge=True)
        torch.testing.assert_close(base(IDS), merged(IDS), atol=1e-5, rtol=1e-5)


def test_export_adapter_only_command_and_load_with_adapter(module, tokenizer, tmp_path):
    """`mmgpt export --adapter-only` writes the adapter; `mmgpt.load(BASE, adapter=DIR)` equals the merged export."""
    from mmgpt.commands.export import main as export_main

    m = module(freeze_vision=True, freeze_projector=True, lora=LORA, lr=1e-2)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(m, datamodule=tiny_data(m))
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "adapter"), "--adapter-only"])
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    # The base the run started from (same seed; training moved only the adapters), saved as a model directory.
    save_exported(module().model.eval(), tokenizer, tmp_path / "base")
    adapted = mmgpt.load(tmp_path / "base", adapter=tmp_path / "adapter").model
    assert not has_lora(adapted.decoder)  # merged: plain layers
    base = mmgpt.load(tmp_path / "base").model
    merged = mmgpt.load(ckpt).model
    with torch.no_grad():
        assert not torch.allclose(base(IDS), merged(IDS), atol=1e-4)
        torch.testing.assert_close(adapted(IDS), merged(IDS), atol=1e-5, rtol=1e-5)


def test_a_run_without_lora_has_no_adapter_to_export(trained, tmp_path):
    _, ckpt = trained
    with pytest.raises(ValueError, match=f"{ckpt}: this run did not train LoRA adapters"):
        export_lora_adapter(ckpt, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_chat_after_load_adapter_uses_the_new_weights(saved, tokenizer):
    """A chat turn cached before ``load_adapter`` is not reused after it: peft merges through ``.data``, which no
    tensor version records, so the pipeline drops its cached turns."""
    base, out = saved
    pipeline = mmgpt.Pipeline(copy.deepcopy(base), tokenizer)
    turn = [{"role": "user", "content": "How many sides does a triangle have?"}]
    first = pipeline.chat(turn, max_new_tokens=6)
    pipeline.load_adapter(out)
    follow = [*turn, {"role": "assistant", "content": first}, {"role": "user", "content": "And a square?"}]
    fresh = mmgpt.Pipeline(copy.deepcopy(base), tokenizer).load_adapter(out)
    expected = fresh.chat(follow, max_new_tokens=6, reuse_cache=False)
    assert expected != mmgpt.Pipeline(copy.deepcopy(base), tokenizer).chat(follow, max_new_tokens=6)  # it matters
    assert pipeline.chat(follow, max_new_tokens=6) == expected
