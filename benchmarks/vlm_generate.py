"""Generation speed of imported HF VLMs at real sizes: ``mmgpt.load(hf_dir)`` against HF ``generate``.

    python benchmarks/vlm_generate.py --model smolvlm --rounds 3      # SmolVLM-256M's sizes (SMOLVLM), batch 1 and 8
    python benchmarks/vlm_generate.py --model paligemma --no-compile --no-int8 --new-tokens 16 --rounds 3
                                                                      # PaliGemma-shaped (PALIGEMMA), HFDecoder
    python benchmarks/vlm_generate.py --model smolvlm --no-compile --no-int8    # float32 eager only

Each model is built by transformers at a released model's sizes with random weights (nothing is downloaded), saved
with its processor and a small offline-trained tokenizer into a temporary directory, and loaded from there twice:
by ``mmgpt.load`` (so the conversion a user runs is the one measured: SmolVLM's Llama becomes the native decoder,
PaliGemma's Gemma stays transformers' own behind ``HFDecoder``) and by transformers. Both get the same processed
inputs (the HF processor's ``input_ids``, ``attention_mask`` and pixels; one 512 px view per SmolVLM picture, no
tiles), greedy decoding and exactly ``--new-tokens`` new tokens (no eos). ``--batch`` prompts of different lengths
(left-padded), each with a picture of its own.

Before timing, the script checks that mmgpt float32 decodes HF's greedy tokens (the first ``--check-tokens``; where
they differ, from which token on), and prints the largest difference of the prefill's next-token logits next to
HF's smallest top-1 margin, so that a float tie is told from a bug (random weights may repeat one token).
It then times, per batch size, interleaved rounds: each round runs every implementation once, in turn, and every
number is the median over ``--rounds`` rounds, every ratio one of numbers from the same run. One call per
implementation and round gives both numbers (a streamer records when each token arrives):

* **time to first token**: image encoding and prefill, until the first new token exists;
* **decode tokens/s**: batch x (new tokens - 1) / the time from the first new token to the last.

One torch thread (``--threads``): on a small CPU shared with other jobs a second OpenMP thread only adds contention
(``benchmarks/README.md``). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mmgpt
from mmgpt.generation.decode_state import DecodeState
from mmgpt.generation.engine import generate, stream_tokens
from mmgpt.generation.f32_gemm import f32_gemm_available, f32_gemm_unavailable_reason
from mmgpt.generation.int8_gemv import int8_gemv_available
from mmgpt.generation.quantize import quantize_decoder_
from mmgpt.models.decoder import Decoder
from mmgpt.models.image_tiling import FAKE_TOKEN, GLOBAL_TOKEN, row_col_token
from mmgpt.prompts import IMAGE

QUESTIONS = [
    "What is in this image?",
    "Describe the picture in detail, please.",
    "How many shapes are there?",
    "What colour is the largest shape, and where is it?",
    "Is there any text?",
    "Write a short caption for this picture.",
    "What is on the left side of the image, and what is on the right side?",
    "Why?",
]

# SmolVLM-256M-Instruct (HuggingFaceTB/SmolVLM-256M-Instruct, config.json as published): SigLIP-B/16 at 512 px,
# pixel shuffle 4 (32 x 32 patches -> 64 image tokens), SmolLM2-135M as the text model with the vocabulary grown by
# Idefics3's special tokens (49152 -> 49280) and an untied LM head.
SMOLVLM = dict(
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=512, patch_size=16),
    text_config=dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                     rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=False),
    scale_factor=4, tie_word_embeddings=False,
)
# PaliGemma-3B-pt-224's shape with a smaller tower and fewer layers: SigLIP-B/16 at 224 px in place of its So400m/14
# (196 image tokens, not 256), and its Gemma-2B text model cut from 18 layers to --gemma-layers: width 2048, 8 query
# heads of 256 on one key/value head, GeGLU 16384, the full 257216-token vocabulary with tied embeddings (2.1 GB in
# float32, read by every decode step).
PALIGEMMA = dict(
    vision_config=dict(model_type="siglip_vision_model", hidden_size=768, intermediate_size=3072,
                       num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16,
                       vision_use_head=False),
    text_config=dict(model_type="gemma", vocab_size=257216, hidden_size=2048, intermediate_size=16384,
                     num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192,
                     hidden_activation="gelu_pytorch_tanh"),
    projection_dim=2048, hidden_size=2048,
)
# SmolVLM-256M-Instruct's processor chat template.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def bpe_tokenizer(special: list[str], post_bos: str | None = None, **special_tokens: str):
    """A small byte-level BPE trained offline on the questions, with ``special`` tokens, left-padding (the models'
    vocabularies are larger: ids past the tokenizer's are never fed, only generated). ``special_tokens`` name the
    bos/eos/pad tokens; ``post_bos`` is written before every text, as Gemma's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(QUESTIONS * 5, trainer)
    if post_bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{post_bos} $A", pair=f"{post_bos} $A $B", special_tokens=[(post_bos, tok.token_to_id(post_bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **special_tokens)


def picture(size: int, seed: int) -> Image.Image:
    """Colour gradients with noise: a resize has edges and flat parts to work on."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / (size - 1), y * 255 / (size - 1), (x + y + 40 * seed) % 256], -1)
    return Image.fromarray(np.clip(base + g.integers(-40, 41, base.shape), 0, 255).astype(np.uint8), "RGB")


def save_smolvlm(path: Path, seed: int):
    """SmolVLM-256M's sizes, random weights, and an Idefics3 processor without image splitting."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tokens = [FAKE_TOKEN, IMAGE, "<end_of_utterance>", GLOBAL_TOKEN] + [
        row_col_token(i, j) for i in range(1, 5) for j in range(1, 5)]
    tokenizer = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", *tokens], bos_token="<|im_start|>",
                              eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    text = dict(SMOLVLM["text_config"], pad_token_id=tokenizer.pad_token_id)
    config = Idefics3Config(**dict(SMOLVLM, text_config=text), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE))
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(config).save_pretrained(str(path))
    # One 512 px view per picture: no tiles (do_image_splitting=False), the picture resized to the tower's size.
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 512},
                                             max_image_size={"longest_edge": 512})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64,
                                  chat_template=SMOLVLM_CHAT_TEMPLATE)
    processor.save_pretrained(str(path))
    return processor, Idefics3ForConditionalGeneration


def save_paligemma(path: Path, seed: int, layers: int):
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tokenizer = bpe_tokenizer(["<pad>", "<eos>", "<bos>"], post_bos="<bos>", bos_token="<bos>", eos_token="<eos>",
                              pad_token="<pad>")
    processor = PaliGemmaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 224, "width": 224}, image_seq_length=196),
        tokenizer=tokenizer,
    )
    tokenizer = processor.tokenizer  # with <image> added
    text = dict(PALIGEMMA["text_config"], num_hidden_layers=layers, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = PaliGemmaConfig(**dict(PALIGEMMA, text_config=text), image_token_index=processor.image_token_id)
    torch.manual_seed(seed)
    PaliGemmaForConditionalGeneration(config).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return processor, PaliGemmaForConditionalGeneration


def inputs_for(kind: str, processor, batch: int) -> dict[str, torch.Tensor]:
    """The HF processor's inputs for ``batch`` prompts (different questions: left-padded), a picture each."""
    questions = QUESTIONS[:batch] if batch <= len(QUESTIONS) else [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
    if kind == "smolvlm":
        size = 512
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
            for q in questions]
        images = [[picture(size, i)] for i in range(batch)]
    else:
        size = 224
        texts = [f"answer en {q}" for q in questions]
        images = [picture(size, i) for i in range(batch)]
    out = processor(text=texts, images=images, padding=True, return_tensors="pt")
    return {k: v for k, v in out.items() if k != "labels"}  # PaliGemma's processor adds labels: no loss here


def mmgpt_args(kind: str, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels = inputs["pixel_values"]
    if kind == "smolvlm":
        pixels = pixels.flatten(0, 1)  # (B, 1 view, 3, S, S) -> one mmgpt image per picture
    return inputs["input_ids"], inputs["attention_mask"], pixels


class Clock:
    """A transformers streamer that records when each token arrives (the first call is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_timed(hf, inputs: dict, n: int, pad: int) -> tuple[float, float]:
    """(time to first token, decode seconds for the other n - 1 tokens) of one HF generate call."""
    clock = Clock()
    start = time.perf_counter()
    out = hf.generate(**inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad,
                      streamer=clock)
    end = time.perf_counter()
    assert out.shape[1] == inputs["input_ids"].shape[1] + n and len(clock.times) == n + 1
    return clock.times[1] - start, end - clock.times[1]


def mmgpt_timed(model, args: tuple, n: int, compile: bool) -> tuple[float, float]:
    ids, mask, pixels = args
    start = time.perf_counter()
    first, steps = None, 0
    for _rows, _tokens in stream_tokens(model, ids, mask, pixels, max_new_tokens=n, compile=compile):
        steps += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert steps == n
    return first - start, end - first


@torch.inference_mode()
def check_greedy(kind: str, hf, model, inputs: dict, n: int, pad: int) -> str:
    """Whether mmgpt float32's first ``n`` greedy tokens are HF's, row by row, and how far apart the two prefills'
    next-token logits are (random weights may pick few distinct tokens, so the logits say more than the tokens)."""
    theirs = hf.generate(**inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
    theirs = theirs[:, inputs["input_ids"].size(1):]
    ids, mask, pixels = mmgpt_args(kind, inputs)
    ours = generate(model, ids, mask, pixels, max_new_tokens=n)
    with DecodeState(model, ids, mask, max_new_tokens=1) as state:
        logits = state.prefill(pixels)  # (B, V): the last position of every left-padded row
    hf_logits = hf(**inputs, logits_to_keep=1).logits[:, -1]
    top2 = hf_logits.topk(2, dim=-1).values
    gap = (f"the prefill's next-token logits (largest |HF| {float(hf_logits.abs().max()):.2f}) differ by at most "
           f"{float((logits - hf_logits).abs().max()):.1e}; HF's smallest top-1 - top-2 margin "
           f"{float((top2[:, 0] - top2[:, 1]).min()):.1e}")
    same = (ours == theirs).all(dim=1)
    B = theirs.size(0)
    if bool(same.all()):
        distinct = len(set(theirs.flatten().tolist()))
        return f"greedy tokens equal to HF's: {B}/{B} rows x {n} tokens ({distinct} distinct tokens); {gap}"
    firsts = [int((o != t).nonzero()[0]) for o, t, s in zip(ours, theirs, same, strict=True) if not s]
    return (f"greedy tokens equal to HF's in {int(same.sum())}/{B} rows; the others first differ at token {firsts}; "
            f"{gap}")


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def run(kind: str, args) -> None:
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix=f"vlm-{kind}-") as tmp:
        path = Path(tmp)
        start = time.perf_counter()
        if kind == "smolvlm":
            processor, hf_cls = save_smolvlm(path, args.seed)
        else:
            processor, hf_cls = save_paligemma(path, args.seed, args.gemma_layers)
        print(f"saved the random {kind} model in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        pipeline = mmgpt.load(path)
        model = pipeline.model.eval()
        hf = hf_cls.from_pretrained(str(path), attn_implementation="sdpa").eval()
    pad = processor.tokenizer.pad_token_id
    decoder = type(model.decoder).__name__
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    print(f"\n### {kind}: {n_all / 1e6:.1f} M parameters ({n_dec / 1e6:.1f} M in the decoder, mmgpt's {decoder}), "
          f"{model.image_seq_len} image tokens per picture\n")
    impls = {"HF transformers": None, "mmgpt": (model, False)}
    if args.compile:
        impls["mmgpt, compile=True"] = (model, True)
    if args.int8 and isinstance(model.decoder, Decoder):
        q = copy.deepcopy(model)
        quantize_decoder_(q.decoder, "int8")
        impls["mmgpt, int8 weights"] = (q, False)
        if args.compile:
            impls["mmgpt, int8 weights, compile=True"] = (q, True)
    for B in args.batch:
        inputs = inputs_for(kind, processor, B)
        T = inputs["input_ids"].size(1)
        print(check_greedy(kind, hf, model, inputs, args.check_tokens, pad))
        times = {name: ([], []) for name in impls}
        with torch.inference_mode():
            for name, impl in impls.items():  # warm up (and compile)
                start = time.perf_counter()
                if impl is None:
                    hf_timed(hf, inputs, args.new_tokens, pad)
                else:
                    mmgpt_timed(impl[0], mmgpt_args(kind, inputs), args.new_tokens, impl[1])
                print(f"  batch {B}, warm-up {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            for _ in range(args.rounds):
                for name, impl in impls.items():
                    if impl is None:
                        first, rest = hf_timed(hf, inputs, args.new_tokens, pad)
                    else:
                        first, rest = mmgpt_timed(impl[0], mmgpt_args(kind, inputs), args.new_tokens, impl[1])
                    times[name][0].append(first)
                    times[name][1].append(B * (args.new_tokens - 1) / rest)
        print(f"\nbatch {B}: prompts of up to {T} tokens (left-padded), {args.new_tokens} new tokens, median of "
              f"{args.rounds} interleaved rounds (ratios of numbers from this one run)\n")
        print("| batch | implementation | time to first token (s) | decode tokens/s | decode vs HF "
              "| first token vs HF |")
        print("| ---: | --- | ---: | ---: | ---: | ---: |")
        base_first = statistics.median(times["HF transformers"][0])
        base_rate = statistics.median(times["HF transformers"][1])
        for name, (firsts, rates) in times.items():
            first, rate = statistics.median(firsts), statistics.median(rates)
            print(f"| {B} | {name} | {first:.2f} | {rate:.1f} | {rate / base_rate:.2f}x | {base_first / first:.2f}x |")
        print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smolvlm", "paligemma"), nargs="+", default=["smolvlm"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--check-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gemma-layers", type=int, default=2, help="the PaliGemma-shaped model's Gemma layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-int8", dest="int8", action="store_false")
    args = parser.parse_args()

    import transformers

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    torch.set_num_threads(args.threads)
    kernel = "AVX-512 kernel" if f32_gemm_available() else f"torch ({f32_gemm_unavailable_reason()})"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); float32 decode matmuls: {kernel}; "
          f"int8 kernel: {int8_gemv_available()}")
    print(f"load average before: {load_average()}")
    for kind in args.model:
        run(kind, args)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
