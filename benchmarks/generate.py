"""Generation speed: mmgpt against HF transformers' ``LlavaForConditionalGeneration`` of the same size.

    python benchmarks/generate.py                  # quickstart sizes (configs/shapes.yaml), batch 1 and 16
    python benchmarks/generate.py --compile        # add mmgpt with a torch.compile'd decode step
    python benchmarks/generate.py --no-scaling     # skip mmgpt's KV-cache vs no-cache part

Both models get random weights, the same prompts and the same image, greedy decoding and exactly
``--new-tokens`` new tokens (no eos), warm (one untimed run first). The implementations are timed in turn within
each round, ``--rounds`` times, and every number is the median over rounds, so a slowdown of a shared machine hits
both sides of a ratio alike. Results print as Markdown (see benchmarks/README.md).

The HF model is as close to mmgpt's as HF Llava allows:

* vision tower: HF CLIP with the same depth, width, heads, MLP width (4x) and image size. HF Llava has no pixel
  shuffle, so to give its decoder the same number of image tokens its patches are ``pixel_shuffle`` times larger
  (96 px / 32 px patches = 9 tokens, where mmgpt's ViT sees 16 px patches, 36 tokens, merged 2x2 into 9). HF's
  vision tower thus does about a quarter of mmgpt's vision work, in HF's favour.
* projector: both a 2-layer GELU MLP into the decoder width; mmgpt's input is 4x wider (the 2x2 merge).
* decoder: an HF Llama with exactly mmgpt's config (``mmgpt.convert.hf_llama.to_hf_llama_config``): layers, width,
  heads, SwiGLU width, RoPE base, tied embeddings, vocabulary. HF uses its SDPA attention and dynamic KV cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import yaml

from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.hf_llama import to_hf_llama_config
from mmgpt.generation.engine import generate
from mmgpt.models.mmgpt import MMGPT
from mmgpt.prompts import IMAGE, render_prompt
from mmgpt.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = [
    "What color is the circle?", "Describe the image.", "How many shapes are there?", "Where is the red square?",
    "Is there a triangle?", "What shape is in the top left corner?", "Count the blue objects.", "Caption this.",
    "What is left of the green star?", "Which shape is the largest one in the picture?", "Any yellow?",
    "Name every shape you can see from left to right.", "What is in the middle?", "Is the square above the circle?",
    "How many red things?", "What color is the shape at the bottom right?",
]


def build_mmgpt(config_path: Path, tokenizer, block_size: int | None = None) -> MMGPT:
    m = yaml.safe_load(config_path.read_text())["model"]
    decoder = dict(m["decoder"], vocab_size=len(tokenizer))
    if block_size:
        decoder["block_size"] = block_size
    config = MMGPTConfig(
        VisionConfig(**m["vision"]), ProjectorConfig(**m.get("projector", {})), DecoderConfig(**decoder),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    torch.manual_seed(0)
    return MMGPT(config).eval()


def build_hf_llava(model: MMGPT, same_patches: bool = False):
    """An HF Llava of mmgpt's sizes. Its patches are ``pixel_shuffle`` times larger, so that its decoder splices
    as many image tokens as mmgpt's; ``same_patches`` keeps mmgpt's patch size (and 4x the image tokens)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    config, vision = model.config, model.vision
    overrides = config.vision.overrides
    patch = config.vision.patch_size or vision.model.patch_embed.patch_size[0]
    if not same_patches:
        patch *= config.projector.pixel_shuffle
    image_seq_len = (config.vision.img_size // patch) ** 2
    clip = CLIPVisionConfig(
        hidden_size=vision.embed_dim, intermediate_size=4 * vision.embed_dim,
        num_hidden_layers=vision.layer_index + 1,  # the blocks mmgpt runs (it prunes the ones after feature_layer)
        num_attention_heads=overrides.get("num_heads", 3), image_size=config.vision.img_size, patch_size=patch,
    )
    llava = LlavaConfig(
        vision_config=clip, text_config=to_hf_llama_config(config.decoder), image_token_index=config.image_token_id,
        image_seq_length=image_seq_len, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(llava).eval()
    hf.generation_config.eos_token_id = None  # a fixed number of tokens, as mmgpt with eos_token_id=None
    hf.generation_config.pad_token_id = 0
    return hf


def inputs(tokenizer, model: MMGPT, batch_size: int, image_seq_len: int | None = None):
    """Left-padded prompts (one image each, the same image) and the pixels, shared by both libraries."""
    image_seq_len = image_seq_len or model.image_seq_len
    texts = [render_prompt(QUESTIONS[i % len(QUESTIONS)], 1, image_seq_len) for i in range(batch_size)]
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    image = torch.rand(3, model.config.vision.img_size, model.config.vision.img_size,
                       generator=torch.Generator().manual_seed(0))
    pixels = model.processor(image)[None].expand(batch_size, -1, -1, -1).contiguous()
    return enc["input_ids"], enc["attention_mask"], pixels


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed_table(args, tokenizer) -> list[str]:
    model = build_mmgpt(args.config, tokenizer)
    hf = build_hf_llava(model)
    hf_same = build_hf_llava(model, same_patches=True) if args.hf_same_patches else None
    n_mm = sum(p.numel() for p in model.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    N = args.new_tokens
    impls = {}
    for B in args.batch_sizes:
        ids, mask, pixels = inputs(tokenizer, model, B)

        def hf_run(n, ids=ids, mask=mask, pixels=pixels, hf=hf):
            out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False)
            assert out.shape[1] == ids.shape[1] + n

        def mm_run(n, ids=ids, mask=mask, pixels=pixels, compile=False):
            assert generate(model, ids, mask, pixels, max_new_tokens=n, compile=compile).shape[1] == n

        def mm_cached_image(n, ids=ids, mask=mask, pixels=pixels):
            # The same image for every prompt: encode it once and splice the embedding into every row.
            embeds = model.encode_images(pixels[:1]).expand(ids.size(0), -1, -1)
            assert generate(model, ids, mask, image_embeds=embeds, max_new_tokens=n).shape[1] == n

        impls[(B, "HF transformers Llava")] = hf_run
        if hf_same is not None:
            same_ids, same_mask, _ = inputs(tokenizer, model, B, hf_same.config.image_seq_length)
            impls[(B, f"HF Llava, mmgpt's patch size ({hf_same.config.image_seq_length} image tokens)")] = partial(
                hf_run, ids=same_ids, mask=same_mask, hf=hf_same
            )
        impls[(B, "mmgpt")] = mm_run
        if args.compile:
            impls[(B, "mmgpt, compile=True")] = lambda n, f=mm_run: f(n, compile=True)
        if B > 1:
            impls[(B, "mmgpt, image encoded once")] = mm_cached_image

    times: dict = {key: {"full": [], "first": []} for key in impls}
    with torch.inference_mode():
        for fn in impls.values():  # warm up (and compile)
            fn(N)
            fn(1)
        for _ in range(args.rounds):
            for key, fn in impls.items():
                times[key]["full"].append(timed(lambda fn=fn: fn(N)))
                times[key]["first"].append(timed(lambda fn=fn: fn(1)))

    lines = [
        f"mmgpt {n_mm / 1e6:.2f} M parameters, HF Llava {n_hf / 1e6:.2f} M; {N} new tokens; median of "
        f"{args.rounds} interleaved rounds.",
        "",
        "| batch | implementation | time to first token (ms) | tokens/s | decode tokens/s | tokens/s vs HF |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for B in args.batch_sizes:
        base = None
        for (b, name), t in times.items():
            if b != B:
                continue
            full, first = statistics.median(t["full"]), statistics.median(t["first"])
            tps, decode = B * N / full, B * (N - 1) / max(full - first, 1e-9)
            base = base or tps
            lines.append(f"| {B} | {name} | {first * 1e3:.1f} | {tps:,.0f} | {decode:,.0f} | {tps / base:.2f}x |")
    return lines


def scaling_table(args, tokenizer) -> list[str]:
    lengths = args.scaling_lengths
    model = build_mmgpt(args.config, tokenizer, block_size=max(lengths) + 64)
    ids, mask, pixels = inputs(tokenizer, model, 1)
    lines = [
        f"mmgpt alone, batch 1, block_size raised to {model.config.decoder.block_size}; KV-cached: median of 3 "
        "runs, no cache: one run.",
        "",
        "| new tokens | KV cache tokens/s | no cache tokens/s | speed-up |",
        "| ---: | ---: | ---: | ---: |",
    ]
    with torch.inference_mode():
        generate(model, ids, mask, pixels, max_new_tokens=8)
        for n in lengths:
            cached = statistics.median(
                timed(lambda n=n: generate(model, ids, mask, pixels, max_new_tokens=n)) for _ in range(3)
            )
            uncached = timed(lambda n=n: generate(model, ids, mask, pixels, max_new_tokens=n, use_cache=False))
            lines.append(f"| {n} | {n / cached:,.0f} | {n / uncached:,.0f} | {uncached / cached:.1f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shapes.yaml",
                        help="a training config; its model section gives the sizes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a small shared CPU, more threads only add contention)")
    parser.add_argument("--compile", action="store_true", help="also time mmgpt with generate(compile=True)")
    parser.add_argument("--hf-same-patches", action="store_true",
                        help="also time an HF Llava with mmgpt's patch size (same vision work, more image tokens)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the KV-cache vs no-cache lengths")
    parser.add_argument("--scaling-lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # inductor's "no CUDA runtime" note
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} thread(s), float32")
    print()
    print("\n".join(speed_table(args, tokenizer)))
    if not args.no_scaling:
        print()
        print("\n".join(scaling_table(args, tokenizer)))


if __name__ == "__main__":
    main()
