"""Chat replay: the held-out/replayed prompt split, and scripts/chat_replay.py's data and agreement score."""

from __future__ import annotations

import json
import runpy
import sys

import pytest

from mmgpt.data.chat_prompts import TEST_PROMPTS, chat_prompts
from mmgpt.data.sources import Conversations
from mmgpt.pipeline import DEFAULT_MODEL

SCRIPT = "scripts/chat_replay.py"


def test_train_and_test_prompts_are_disjoint_and_distinct():
    train, test = chat_prompts("train"), chat_prompts("test")
    assert len(train) >= 150 and len(test) == len(TEST_PROMPTS)
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    # The recipe's own check (configs/smollm2_shapes_instruct.yaml) stays held out: never replayed, so keeping it
    # is generalisation.
    assert "What is the capital of France?" in test
    assert chat_prompts("train") == train  # a fixed order: the replay file is reproducible
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        chat_prompts("val")


def run(monkeypatch, capsys, *args: str) -> list[str]:
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    runpy.run_path(SCRIPT, run_name="__main__")
    return capsys.readouterr().out.strip().splitlines()


def test_replay_file_trains_as_conversations_and_a_model_agrees_with_itself(tmp_path, monkeypatch, capsys, trained):
    out = tmp_path / "replay.json"
    common = ["--limit", "6", "--max-new-tokens", "12", "--threads", "1"]
    lines = run(monkeypatch, capsys, "--model", str(DEFAULT_MODEL), "--split", "test", "--out", str(out), *common)
    records = json.loads(out.read_text())
    assert lines[-1].startswith(f"{out}: {len(records)} answers; {6 - len(records)} of 6 dropped")
    assert records, "the default model answers text questions in a few words: some must end within 12 tokens"
    # The file is a text-only conversations source: each sample supervises exactly the model's answer.
    ds = Conversations(out)
    assert [ds[i].prompt for i in range(len(ds))] == [r["conversations"][0]["value"] for r in records]
    assert all(ds[i].image is None and ds[i].task == "text" for i in range(len(ds)))
    assert {r["conversations"][0]["value"] for r in records} <= set(TEST_PROMPTS[:6])
    # A reference for --compare keeps the cut answers too: every prompt is compared.
    run(monkeypatch, capsys, "--model", str(DEFAULT_MODEL), "--split", "test", "--out", str(tmp_path / "all.json"),
        "--keep-unfinished", *common)
    assert [r["conversations"][0]["value"] for r in json.loads((tmp_path / "all.json").read_text())] == TEST_PROMPTS[:6]

    # Greedy decoding is deterministic: the same model reproduces every answer.
    same = json.loads(run(monkeypatch, capsys, "--model", str(DEFAULT_MODEL), "--compare", str(out), *common)[-1])
    assert {k: same[k] for k in ("prompts", "identical", "prefix_agreement@32", "teacher_forced_top1")} == {
        "prompts": len(records), "identical": 1.0, "prefix_agreement@32": 1.0, "teacher_forced_top1": 1.0}
    assert same["reference_ppl"] > 1.0  # its own greedy answers: its first choices, yet not certain ones
    # A barely trained model does not.
    _, ckpt = trained
    other = run(monkeypatch, capsys, "--model", str(ckpt), "--compare", str(out), *common)
    score = json.loads(other[-1])
    assert score["identical"] < 1.0 and score["prefix_agreement@32"] < 1.0 and score["teacher_forced_top1"] < 1.0
    assert score["reference_ppl"] > same["reference_ppl"]
    assert any(line.startswith("    reference: ") for line in other)  # the differing pairs are shown


def test_needs_exactly_one_of_out_and_compare(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--model", str(DEFAULT_MODEL)])
    with pytest.raises(SystemExit):
        runpy.run_path(SCRIPT, run_name="__main__")
    assert "exactly one of --out and --compare" in capsys.readouterr().err
