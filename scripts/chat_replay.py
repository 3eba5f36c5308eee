"""A model's own answers to general chat prompts: replay data for fine-tuning, and a check of what it kept.

    # replay data: the stage-1 model's LM is SmolLM2 untouched, so these are SmolLM2's own answers
    python scripts/chat_replay.py --model runs/smollm2/align/csv/version_0/checkpoints/last.ckpt \
        --split train --out runs/smollm2/chat_replay.json
    # what stage 2 kept, on held-out prompts: its answers against the stage-1 (= SmolLM2) answers
    python scripts/chat_replay.py --model runs/smollm2/align/.../last.ckpt --split test --keep-unfinished \
        --out runs/smollm2/chat_test.json
    python scripts/chat_replay.py --model runs/smollm2/instruct/.../last.ckpt --split test \
        --compare runs/smollm2/chat_test.json

``--out`` writes LLaVA-format conversations (text only), ready for a ``{kind: conversations, path: ...}`` data
source. Answers are greedy. An answer that does not end within ``--max-new-tokens`` is dropped (and counted):
replaying a cut answer would teach the model to stop mid-sentence (``--keep-unfinished`` keeps them, for a reference
that ``--compare`` generates to the same length).

``--compare REF`` generates answers to REF's prompts and prints, against REF's answers: how many are identical,
the mean share of the first ``--prefix-tokens`` tokens that agree before the first difference, and the pairs that
differ. Then, teacher forced (REF's answer fed token by token): how often REF's next token is this model's first
choice, and REF's perplexity under this model. With REF from the model before fine-tuning, its own scores are
100 % and its perplexity of its own greedy answers. The last line is a JSON object with those numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Subset

import mmgpt
from mmgpt.data.chat_prompts import chat_prompts
from mmgpt.data.sources import Conversations
from mmgpt.eval.evaluate import teacher_forced
from mmgpt.generation.engine import generate as generate_ids


def answer(pipeline, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[tuple[str, bool]]:
    """Greedy answers, each with whether it ended (the end-of-turn token) within ``max_new_tokens``."""
    tok, out = pipeline.tokenizer, []
    for i in range(0, len(prompts), batch_size):
        batch = list(prompts[i : i + batch_size])
        input_ids, attention_mask, _ = pipeline.encode([None] * len(batch), batch)
        new = generate_ids(
            pipeline.model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # (B, max_new_tokens)
        for row in new:
            out.append((tok.decode(row, skip_special_tokens=True).strip(), bool((row == tok.eos_token_id).any())))
        print(f"  {min(i + batch_size, len(prompts))}/{len(prompts)}", file=sys.stderr, flush=True)
    return out


def common_prefix(a: list[int], b: list[int], n: int) -> float:
    """The share of the first ``n`` tokens of ``b`` that ``a`` repeats before the first difference."""
    a, b = a[:n], b[:n]
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return k / max(len(b), 1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported model directory or a Lightning .ckpt")
    parser.add_argument("--split", choices=["train", "test"], default="train", help="which prompts (--out)")
    parser.add_argument("--out", type=Path, help="write the answers as LLaVA-format conversations JSON")
    parser.add_argument("--compare", type=Path, help="a file written by --out: score this model against it")
    parser.add_argument("--max-new-tokens", type=int, default=150)
    parser.add_argument("--prefix-tokens", type=int, default=32, help="tokens compared by the prefix agreement")
    parser.add_argument("--keep-unfinished", action="store_true",
                        help="--out keeps answers cut at --max-new-tokens: for a --compare reference, not for replay")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.compare is None):
        parser.error("give exactly one of --out and --compare")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = mmgpt.load(args.model)

    if args.out is not None:
        prompts = chat_prompts(args.split)[: args.limit]
        answers = answer(pipeline, prompts, args.max_new_tokens, args.batch_size)
        kept = [(p, a) for p, (a, ended) in zip(prompts, answers, strict=True) if (ended or args.keep_unfinished) and a]
        records = [
            {"id": f"chat/{args.split}/{i}",
             "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]}
            for i, (p, a) in enumerate(kept)
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        print(f"{args.out}: {len(kept)} answers; {len(prompts) - len(kept)} of {len(prompts)} dropped "
              f"(no end within {args.max_new_tokens} tokens, or empty)")
        return

    records = Conversations(args.compare)
    records = Subset(records, range(min(len(records), args.limit or len(records))))
    reference = [(records[i].prompt, records[i].target) for i in range(len(records))]
    prompts = [p for p, _ in reference]
    answers = answer(pipeline, prompts, args.max_new_tokens, args.batch_size)
    tok = pipeline.tokenizer
    same, prefix = 0, []
    for (p, ref), (a, _) in zip(reference, answers, strict=True):
        ids_ref, ids_new = tok(ref, add_special_tokens=False).input_ids, tok(a, add_special_tokens=False).input_ids
        prefix.append(common_prefix(ids_new, ids_ref, args.prefix_tokens))
        same += a == ref
        if a != ref:
            print(f"- {p}\n    reference: {ref!r}\n    this model: {a!r}")
    # Teacher forced: the reference answer fed token by token. Free generation diverges for good at its first
    # different token; this says how often the model's first choice is still the reference's at every step.
    forced = teacher_forced(pipeline.model, tok, records, args.batch_size, max_length=512)
    result = {
        "prompts": len(prompts), "identical": same / len(prompts),
        f"prefix_agreement@{args.prefix_tokens}": sum(prefix) / len(prefix),
        "teacher_forced_top1": forced["top1"] / forced["tokens"],
        "reference_ppl": math.exp(forced["nll"] / forced["tokens"]),
    }
    print(f"identical answers: {same}/{len(prompts)}; mean agreement of the first {args.prefix_tokens} tokens: "
          f"{result[f'prefix_agreement@{args.prefix_tokens}']:.1%}; teacher forced, the reference's token is this "
          f"model's first choice {result['teacher_forced_top1']:.1%} of the time, perplexity of the reference "
          f"{result['reference_ppl']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
