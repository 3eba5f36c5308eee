"""Generation-based evaluation: scoring grouped by task, and scripts/evaluate.py's output contract."""

from __future__ import annotations

import json
import runpy
import sys

import pytest

from mmgpt.data import ShapesConfig, ShapesDataset
from mmgpt.eval.evaluate import evaluate, score


def test_score_groups_by_task_and_question_type():
    rows = [
        {"task": "caption", "qtype": "", "prediction": "a red circle.", "answers": ["a red circle."]},
        {"task": "caption", "qtype": "", "prediction": "a blue square.", "answers": ["a red circle."]},
        {"task": "vqa", "qtype": "color", "prediction": "red", "answers": ["red"]},
        {"task": "vqa", "qtype": "color", "prediction": "blue", "answers": ["red"]},
        {"task": "vqa", "qtype": "count", "prediction": "Two", "answers": ["two"]},
        {"task": "text", "qtype": "", "prediction": "four", "answers": ["four"]},
    ]
    m = score(rows)
    assert m["samples"] == 6
    assert m["caption/exact_match"] == 0.5 and m["caption/samples"] == 2
    assert m["vqa/vqa_acc"] == pytest.approx(2 / 3)
    assert m["vqa/vqa_acc/color"] == 0.5 and m["vqa/vqa_acc/count"] == 1.0  # "Two" normalizes to "2" as "two"
    assert m["text/exact_match"] == 1.0


def test_evaluate_predicts_every_sample_in_order(model, tokenizer):
    ds = ShapesDataset("test", size=2, config=ShapesConfig(image_size=32))
    metrics, rows = evaluate(model, tokenizer, ds, batch_size=3, max_new_tokens=4, limit=7)
    assert [r["id"] for r in rows] == [ds[i].id for i in range(7)]
    assert metrics["samples"] == 7
    assert {r["task"] for r in rows} == {"caption", "vqa", "text"}
    assert metrics["text/ppl"] > 1.0  # an untrained model is far from certain of the reference answers


def test_evaluate_script_prints_json_last_line(model, tokenizer, tmp_path, capsys, monkeypatch):
    from mmgpt.pipeline import Pipeline

    Pipeline(model, tokenizer).save_pretrained(tmp_path / "m")
    cfg = tmp_path / "data.yaml"
    cfg.write_text("data:\n  shapes: {image_size: 32}\n  test: [{kind: shapes, size: 2}]\n  max_length: 96\n")
    argv = ["evaluate.py", "--model", str(tmp_path / "m"), "--data", str(cfg), "--limit", "6",
            "--max-new-tokens", "4", "--predictions", str(tmp_path / "p.jsonl")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path("scripts/evaluate.py", run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["samples"] == 6
    assert {"caption/cider_d", "vqa/vqa_acc", "text/ppl"} <= set(result)
    assert len(lines) > 2  # a table precedes the JSON
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(isinstance(p["prediction"], str) for p in preds)


def test_evaluate_at_image_sizes_scores_each_size(model, tokenizer, tmp_path, capsys):
    from mmgpt.commands.evaluate import main
    from mmgpt.pipeline import Pipeline

    Pipeline(model, tokenizer).save_pretrained(tmp_path / "m")
    cfg = tmp_path / "data.yaml"
    cfg.write_text("data:\n  shapes: {size_range: [20, 30]}\n  test: [{kind: shapes, size: 2}]\n  max_length: 96\n")
    argv = ["--model", str(tmp_path / "m"), "--data", str(cfg), "--limit", "6", "--max-new-tokens", "4",
            "--image-size", "32", "64x40", "--predictions", str(tmp_path / "p.jsonl")]
    by_size = main(argv)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(result) == ["32", "64x40"] and result["32"]["samples"] == 6
    assert result == json.loads(json.dumps({k: {n: (int(v) if n.endswith("samples") else round(v, 6))
                                                    for n, v in m.items()} for k, m in by_size.items()}))
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["image_size"] for p in preds] == ["32"] * 6 + ["64x40"] * 6
    assert [p["id"] for p in preds[:6]] == [p["id"] for p in preds[6:]]  # the same samples at each size


@pytest.mark.parametrize("size", ["64x", "big", "0x-3"])
def test_evaluate_rejects_a_bad_image_size(size, capsys):
    from mmgpt.commands.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(["--image-size", size])
    assert e.value.code == 2 and "--image-size" in capsys.readouterr().err
