"""Generation speed: mmgpt against HF transformers' ``LlavaForConditionalGeneration`` of the same size.

    python benchmarks/generate.py                  # quickstart sizes (configs/shapes.yaml), batch 1 and 16
    python benchmarks/generate.py --compile        # add mmgpt with a torch.compile'd decode step
    python benchmarks/generate.py --no-scaling     # skip mmgpt's KV-cache vs no-cache part
    python benchmarks/generate.py --sweep --compile --no-scaling     # every model of MODELS, 2 M to 27 M parameters
    python benchmarks/generate.py --model 8m-gqa --decoder n_layer=4 # one of them, with a decoder field changed

``--model`` picks entries of ``MODELS`` (default: the quickstart), ``--sweep`` all of them: each is the model of
``--config`` with some decoder and vision fields changed (``MODELS`` says which and why); ``--decoder FIELD=VALUE``
(repeatable, the value read as YAML) changes a ``DecoderConfig`` field of every model picked.

Both models get the same decoder weights (random, copied from mmgpt into HF's Llama), the same prompts and the
same image, greedy decoding and exactly ``--new-tokens`` new tokens (no eos), warm (one untimed run first). Before
any timing the script checks that both decode the very same tokens from the same spliced prompt embeddings (their
vision towers differ), and that ``compile=True`` decodes the eager tokens; it stops if not. The implementations are
timed in turn within each round, ``--rounds`` times, and every number is the median over rounds, so a slowdown of a
shared machine hits both sides of a ratio alike (``--cpu-time`` times the process's CPU time instead of the wall
clock: on a machine whose other jobs take turns with this one, the time it was not running is left out). Results
print as Markdown (see benchmarks/README.md).

How far each is from this CPU's limit: a decode step reads every decoder weight once (its bytes: the parameters
but the input embedding, of which it reads one row per token) and multiplies each by every row of the batch (2
FLOPs per matmul weight and row). It can take no less than the larger of the weights' bytes over the memory
bandwidth (a large tensor copy, timed here) and its FLOPs over the float32 matmul peak (the faster of torch's
``x @ w`` and oneDNN's linear at ``benchmarks/cpu_matmul.py``'s shape, timed here): at batch 1 the bandwidth, at 16
the matmul peak. "% of CPU limit" is the decode tokens/s against the tokens/s at that bound. Weights that fit the
caches (the quickstart's 3.5 MB) are read faster than from memory, so there a small model could pass 100 %.

The HF model is as close to mmgpt's as HF Llava allows:

* vision tower: HF CLIP with the same depth, width, heads, MLP width (4x) and image size. HF Llava has no pixel
  shuffle, so to give its decoder the same number of image tokens its patches are ``pixel_shuffle`` times larger
  (with a 2x2 shuffle, 32 px patches where mmgpt's ViT sees 16 px ones, merged 2x2): its vision tower then does
  about a quarter of mmgpt's vision work, in HF's favour. Without a shuffle (``configs/shapes.yaml`` today) both
  see the same patches.
* projector: both a 2-layer GELU MLP into the decoder width (mmgpt's input is r^2 wider with an r x r shuffle).
* decoder: an HF Llama with exactly mmgpt's config (``mmgpt.convert.hf_llama.to_hf_llama_config``): layers, width,
  heads, key/value heads, SwiGLU width, RoPE base, tied embeddings, vocabulary, and mmgpt's weights. HF uses its
  SDPA attention and dynamic KV cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from cpu_matmul import matmul_gflops

from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.hf_llama import to_hf_llama_config, to_hf_llama_state_dict
from mmgpt.generation.engine import generate
from mmgpt.models.mmgpt import MMGPT
from mmgpt.prompts import IMAGE, render_prompt
from mmgpt.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent

# The sweep: changes to --config's model section, from the quickstart's size to ~27 M parameters, MHA and GQA,
# tied and untied embeddings. The vision tower stays the config's (the quickstart's random 2-block ViT-Tiny).
MODELS: dict[str, dict[str, dict]] = {
    # As the config says: 4 x 128, MHA (4 heads), tied embeddings, 9 image tokens; 2 M parameters.
    "quickstart": {},
    # 10 x 256, GQA (8 query heads on 2 key/value heads), untied; a 128 px image in 16 px patches gives 64 image
    # tokens, and block_size 256 holds them, the question and 64 new tokens. 8 M parameters.
    "8m-gqa": {
        "decoder": {"n_layer": 10, "n_embd": 256, "n_head": 8, "n_query_groups": 2, "tie_embeddings": False,
                    "block_size": 256},
        "vision": {"img_size": 128},
    },
    # 8 x 512, MHA (8 heads), untied, 9 image tokens: 27 M parameters, 105 MB of decoder weights, well past the
    # 32 MB L3 cache, so a batch-1 step streams them from memory.
    "27m-mha": {"decoder": {"n_layer": 8, "n_embd": 512, "n_head": 8, "tie_embeddings": False}},
}

QUESTIONS = [
    "What color is the circle?", "Describe the image.", "How many shapes are there?", "Where is the red square?",
    "Is there a triangle?", "What shape is in the top left corner?", "Count the blue objects.", "Caption this.",
    "What is left of the green star?", "Which shape is the largest one in the picture?", "Any yellow?",
    "Name every shape you can see from left to right.", "What is in the middle?", "Is the square above the circle?",
    "How many red things?", "What color is the shape at the bottom right?",
]


def build_mmgpt(config_path: Path, tokenizer, changes: dict | None = None, block_size: int | None = None) -> MMGPT:
    """The model of ``config_path``'s model section, with ``changes`` (``{"decoder": {...}, "vision": {...}}``)
    applied and random weights."""
    m = yaml.safe_load(config_path.read_text())["model"]
    changes = changes or {}
    decoder = dict(m["decoder"], **changes.get("decoder", {}), vocab_size=len(tokenizer))
    if block_size:
        decoder["block_size"] = block_size
    config = MMGPTConfig(
        VisionConfig(**dict(m["vision"], **changes.get("vision", {}))), ProjectorConfig(**m.get("projector", {})),
        DecoderConfig(**decoder), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    torch.manual_seed(0)
    return MMGPT(config).eval()


def build_hf_llava(model: MMGPT, same_patches: bool = False):
    """An HF Llava of mmgpt's sizes, with mmgpt's decoder weights. Its patches are ``pixel_shuffle`` times larger,
    so that its decoder splices as many image tokens as mmgpt's; ``same_patches`` keeps mmgpt's patch size (and
    ``pixel_shuffle**2`` times the image tokens)."""
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
        tie_word_embeddings=config.decoder.tie_embeddings,
    )
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(llava).eval()
    hf.generation_config.eos_token_id = None  # a fixed number of tokens, as mmgpt with eos_token_id=None
    hf.generation_config.pad_token_id = 0
    # The same decoder weights: then both decode the same tokens (checked before timing, see check_same_tokens).
    weights = to_hf_llama_state_dict(model.decoder.state_dict(), config.decoder)
    language = {k.removeprefix("model."): v for k, v in weights.items() if k != "lm_head.weight"}
    hf.model.language_model.load_state_dict(language)
    hf.lm_head.weight.data.copy_(weights.get("lm_head.weight", weights["model.embed_tokens.weight"]))
    tied = hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    if tied != config.decoder.tie_embeddings:
        raise RuntimeError(f"HF Llava's embeddings are {'' if tied else 'un'}tied, mmgpt's are not: not the same size")
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


def check_same_tokens(model: MMGPT, hf, ids, mask, pixels, n: int, compile: bool) -> None:
    """Raise unless HF's Llama decodes mmgpt's greedy tokens from mmgpt's spliced prompt embeddings (their vision
    towers differ, their decoders are the same), and ``compile=True`` the eager ones."""
    ours = generate(model, ids, mask, pixels, max_new_tokens=n)
    theirs = hf.generate(inputs_embeds=model.embed(ids, pixels), attention_mask=mask, max_new_tokens=n,
                         min_new_tokens=n, do_sample=False)[:, -n:]
    if not torch.equal(ours, theirs):
        rows = (ours != theirs).any(dim=1).nonzero().flatten().tolist()
        raise AssertionError(f"mmgpt's greedy tokens differ from HF's in rows {rows} of {ids.size(0)}")
    if compile and not torch.equal(generate(model, ids, mask, pixels, max_new_tokens=n, compile=True), ours):
        raise AssertionError("mmgpt's greedy tokens differ between compile=True and eager")


CLOCK = time.perf_counter  # main() sets time.process_time for --cpu-time


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: bytes read plus bytes written by a copy of a tensor far larger than the caches,
    median of ``repeats``."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    return 2 * nbytes / statistics.median(timed(lambda: dst.copy_(src)) for _ in range(repeats))


def decode_cost(model: MMGPT) -> tuple[int, int]:
    """What one decode step of one row costs the decoder: the bytes of weights it reads (all of them but the input
    embedding, of which it reads one row) and its matmul FLOPs (2 per matmul weight)."""
    decoder = model.decoder
    params = {p.data_ptr(): p for p in decoder.parameters()}  # a tied head counts once
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    if decoder.lm_head.weight is not decoder.wte.weight:
        weight_bytes -= decoder.wte.weight.numel() * decoder.wte.weight.element_size()
    flops = 2 * sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    return weight_bytes, flops


def describe(model: MMGPT) -> str:
    d = model.config.decoder
    heads = f"{d.n_head} heads" if d.n_query_groups == d.n_head else f"{d.n_head} heads on {d.n_query_groups} KV heads"
    tied = "tied" if d.tie_embeddings else "untied"
    return f"decoder {d.n_layer} x {d.n_embd}, {heads}, SwiGLU {d.intermediate_size}, {tied} embeddings"


def speed_table(args, tokenizer, name: str, changes: dict, cpu: dict[str, float]) -> list[str]:
    model = build_mmgpt(args.config, tokenizer, changes)
    hf = build_hf_llava(model)
    hf_same = build_hf_llava(model, same_patches=True) if args.hf_same_patches else None
    n_mm = sum(p.numel() for p in model.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    weight_bytes, flops = decode_cost(model)
    N = args.new_tokens
    impls, limits = {}, {}
    for B in args.batch_sizes:
        ids, mask, pixels = inputs(tokenizer, model, B)
        with torch.inference_mode():
            check_same_tokens(model, hf, ids, mask, pixels, N, args.compile)
        # The fastest a decode step of B rows can be: its weights' bytes from memory, or its FLOPs at the peak.
        step = max(weight_bytes / cpu["bandwidth"], B * flops / cpu["peak"])
        limits[B] = (B / step, "bandwidth" if weight_bytes / cpu["bandwidth"] >= B * flops / cpu["peak"] else "matmul")

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
        if B > 1 and args.image_once:
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

    bounds = ", ".join(f"batch {B}: {tps:,.0f} tokens/s ({kind})" for B, (tps, kind) in limits.items())
    lines = [
        f"**{name}**: {describe(model)}, {model.image_seq_len} image tokens; mmgpt {n_mm / 1e6:.2f} M parameters, "
        f"HF Llava {n_hf / 1e6:.2f} M. A decode step reads {weight_bytes / 1e6:.1f} MB of weights and does "
        f"{flops / 1e6:.1f} MFLOP per row; CPU limit {bounds}. {N} new tokens; median of {args.rounds} interleaved "
        "rounds; greedy tokens identical to HF's.",
        "",
        "| batch | implementation | time to first token (ms) | tokens/s | decode tokens/s | tokens/s vs HF "
        "| CPU limit (decode tokens/s) | % of CPU limit |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for B in args.batch_sizes:
        base = None
        for (b, impl), t in times.items():
            if b != B:
                continue
            full, first = statistics.median(t["full"]), statistics.median(t["first"])
            tps, decode = B * N / full, B * (N - 1) / max(full - first, 1e-9)
            base = base or tps
            limit, kind = limits[B]
            lines.append(
                f"| {B} | {impl} | {first * 1e3:.1f} | {tps:,.0f} | {decode:,.0f} | {tps / base:.2f}x "
                f"| {limit:,.0f} ({kind}) | {100 * decode / limit:.0f} % |"
            )
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


def cpu_name() -> str:
    """``lscpu``'s model name, and whether the CPU has AVX-512 and the kernels torch picked (ATEN_CPU_CAPABILITY)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    avx512 = "AVX-512" if "avx512f" in fields.get("flags", "").split() else "no AVX-512"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    kernels = f"torch kernels {torch.backends.cpu.get_cpu_capability()}" + (f", oneDNN up to {isa}" if isa else "")
    return f"{fields.get('model name', 'unknown CPU')} ({avx512}; {kernels})"


def parse_changes(pairs: list[str]) -> dict:
    """``["n_layer=4", ...]`` -> ``{"n_layer": 4, ...}``, each value read as YAML (numbers, booleans, null)."""
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not hasattr(DecoderConfig, key):
            raise SystemExit(f"--decoder {pair!r}: expected FIELD=VALUE with a DecoderConfig field, e.g. n_layer=4")
        changes[key] = yaml.safe_load(value)
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shapes.yaml",
                        help="a training config; its model section gives the sizes")
    parser.add_argument("--model", nargs="+", choices=list(MODELS), default=["quickstart"],
                        help="entries of MODELS: the config's model with some sizes changed")
    parser.add_argument("--sweep", action="store_true", help="every entry of MODELS")
    parser.add_argument("--decoder", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a decoder field of every model (repeatable), e.g. --decoder n_query_groups=2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a small shared CPU, more threads only add contention)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the process's CPU time, not the wall clock (a machine busy with other jobs)")
    parser.add_argument("--compile", action="store_true", help="also time mmgpt with generate(compile=True)")
    parser.add_argument("--hf-same-patches", action="store_true",
                        help="also time an HF Llava with mmgpt's patch size (same vision work, more image tokens)")
    parser.add_argument("--no-image-once", dest="image_once", action="store_false",
                        help="skip mmgpt with the image encoded once for the whole batch")
    parser.add_argument("--no-scaling", action="store_true", help="skip the KV-cache vs no-cache lengths")
    parser.add_argument("--scaling-lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    args = parser.parse_args()
    decoder_changes = parse_changes(args.decoder)
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # inductor's "no CUDA runtime" note
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    aten, onednn = matmul_gflops(), matmul_gflops(onednn=True)
    cpu = {"bandwidth": copy_bandwidth(), "peak": max(aten, onednn) * 1e9}
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {cpu_name()}, {os.cpu_count()} "
          f"cores, {torch.get_num_threads()} thread(s), float32, {'CPU' if args.cpu_time else 'wall'} time. Memory "
          f"bandwidth (copy) {cpu['bandwidth'] / 1e9:.1f} "
          f"GB/s; matmul peak {aten:.0f} GFLOP/s with torch's x @ w, {onednn:.0f} with oneDNN "
          "(benchmarks/cpu_matmul.py).")
    for name in MODELS if args.sweep else args.model:
        changes = dict(MODELS[name])
        changes["decoder"] = dict(changes.get("decoder", {}), **decoder_changes)
        print()
        print("\n".join(speed_table(args, tokenizer, name, changes, cpu)), flush=True)
    if not args.no_scaling:
        print()
        print("\n".join(scaling_table(args, tokenizer)))

if __name__ == "__main__":
    main()
