"""Generation-based evaluation: batched greedy answers over a dataset, scored per task.

Captions get BLEU-4, CIDEr-D, ROUGE-L and exact match; VQA gets the VQAv2 accuracy, overall and per question
type; text-only samples get exact match and a teacher-forced perplexity of the reference answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import PreTrainedTokenizerFast

from mmgpt.data.collate import Collator, image_seq_len_for
from mmgpt.eval.metrics import caption_metrics, exact_match, perplexity, vqa_metrics
from mmgpt.generation.engine import generate
from mmgpt.models.mmgpt import MMGPT
from mmgpt.train.loss import next_token_targets, summed_next_token_loss


@torch.inference_mode()
def predict_batch(model: MMGPT, tokenizer: PreTrainedTokenizerFast, batch: dict, max_new_tokens: int) -> list[dict]:
    """Greedy answers for one batch of the ``Collator``'s ``"generate"`` mode.

    Returns:
        One dict per sample: ``id``, ``task``, ``qtype``, ``prompt``, ``prediction``, ``answers``.
    """
    device = model.decoder.wte.weight.device
    images = batch["images"].to(device) if batch["images"] is not None else None
    new = generate(
        model, batch["input_ids"].to(device), batch["attention_mask"].to(device), images,
        max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [
        {"id": i, "task": task, "qtype": qtype, "prompt": prompt, "prediction": text.strip(), "answers": answers}
        for i, task, qtype, prompt, text, answers in zip(
            batch["ids"], batch["tasks"], batch["qtypes"], batch["prompts"], texts, batch["answers"], strict=True
        )
    ]


@torch.inference_mode()
def teacher_forced(
    model: MMGPT, tokenizer: PreTrainedTokenizerFast, dataset: Dataset, batch_size: int = 32, max_length: int = 256
) -> dict[str, float]:
    """The reference answers fed to the model token by token: ``{"nll": summed negative log-likelihood,
    "top1": how many of their tokens are the model's own first choice, "tokens": how many there are}``."""
    device = model.decoder.wte.weight.device
    collate = Collator(tokenizer, model.processor, image_seq_len_for(model), max_length, mode="train")
    total, top1, count = 0.0, 0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        images = batch["images"].to(device) if batch["images"] is not None else None
        is_target, logits_at = next_token_targets(batch["labels"].to(device))  # (B, T-1), (K,)
        logits = model(
            batch["input_ids"].to(device), images, prefix_lengths=batch["prefix_lengths"].to(device),
            logits_at=logits_at,
        )  # (K, V): only where a reference token is predicted
        labels = batch["labels"].to(device)
        nll, n = summed_next_token_loss(logits, labels, is_target, per="token")  # the training loss, summed
        total += float(nll)
        top1 += int((logits.argmax(-1) == labels[:, 1:][is_target]).sum())
        count += int(n)
    return {"nll": total, "top1": top1, "tokens": count}


def score(rows: Sequence[dict]) -> dict[str, float]:
    """Metrics over ``predict_batch``'s rows, grouped by task (keys like ``caption/cider_d``)."""
    out: dict[str, float] = {"samples": float(len(rows))}
    captions = [r for r in rows if r["task"] == "caption"]
    if captions:
        m = caption_metrics([r["prediction"] for r in captions], [r["answers"] for r in captions])
        out.update({f"caption/{k}": v for k, v in m.items()})
        out["caption/samples"] = float(len(captions))
    vqa = [r for r in rows if r["task"] == "vqa"]
    if vqa:
        m = vqa_metrics([r["prediction"] for r in vqa], [r["answers"] for r in vqa], [r["qtype"] for r in vqa])
        out.update({f"vqa/{k}": v for k, v in m.items()})
        out["vqa/samples"] = float(len(vqa))
    text = [r for r in rows if r["task"] == "text"]
    if text:
        out["text/exact_match"] = sum(exact_match(r["prediction"], r["answers"]) for r in text) / len(text)
        out["text/samples"] = float(len(text))
    return out


def evaluate(
    model: MMGPT,
    tokenizer: PreTrainedTokenizerFast,
    dataset: Dataset,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    max_length: int = 256,
    limit: int | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers over (the first ``limit`` samples of) ``dataset``, scored.

    Returns:
        ``(metrics, rows)``: ``score``'s metrics plus ``text/ppl`` (teacher-forced perplexity of the text samples'
        references), and ``predict_batch``'s rows for every sample.
    """
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    was_training = model.training
    model.eval()
    collate = Collator(tokenizer, model.processor, image_seq_len_for(model), max_length, mode="generate")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    rows = [row for batch in loader for row in predict_batch(model, tokenizer, batch, max_new_tokens)]
    metrics = score(rows)
    text_idx = [i for i, r in enumerate(rows) if r["task"] == "text"]
    if text_idx:
        forced = teacher_forced(model, tokenizer, Subset(dataset, text_idx), batch_size, max_length)
        metrics["text/ppl"] = perplexity(forced["nll"], forced["tokens"])
    model.train(was_training)
    return metrics, rows
