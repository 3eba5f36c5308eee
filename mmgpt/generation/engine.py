"""Autoregressive generation: one prefill over image + prompt, then one KV-cached step per token.

``generate`` returns token ids for a left-padded batch; ``stream_tokens`` yields them step by step. Both take a
``GenerationConfig`` and/or its fields as keywords (HF ``generate``'s names and defaults where they overlap):

* greedy (the default) and sampling (``do_sample=True``: ``temperature``, ``top_k``, ``top_p``, ``min_p``),
  both with ``repetition_penalty`` and ``num_return_sequences``;
* beam search (``num_beams > 1``: ``length_penalty``, ``early_stopping``), HF's algorithm (``beam_search.py``).

A row stops at an ``eos_token_id`` (one id or several) or at a stop string, and then leaves the batch: the KV
cache, the positions and the mask drop it, so finished rows cost nothing in later steps. Several prompts about one
image take ``image_embeds`` (``model.encode_images``) to encode it once; ``num_return_sequences`` and beams
prefill a prompt once and copy its cache. ``compile=True`` runs the decode step through ``torch.compile``.
``prefix_cache=`` (a ``PrefixCache``) lets a one-row prompt reuse the KV cache of an earlier prompt it starts with,
as a chat's next turn does.

Both run a ``ContinuousBatch`` (``mmgpt.generation.continuous_batch``) that no prompt joins; a server drives one
directly, adding requests to the running batch between steps and ending rows early.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mmgpt.generation.beam_search import beam_search
from mmgpt.generation.config import GenerationConfig
from mmgpt.generation.continuous_batch import ContinuousBatch
from mmgpt.generation.prefix_cache import PrefixCache
from mmgpt.models.mmgpt import MMGPT


def resolve_generation_config(generation_config: GenerationConfig | None, **kwargs: Any) -> GenerationConfig:
    """``generation_config`` (default: ``GenerationConfig()``) with ``kwargs`` applied; building it validates it."""
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        # transformers' GenerationConfig has other fields, and its update() returns the unused keywords.
        raise TypeError(
            f"generation_config must be an mmgpt.GenerationConfig, got {type(generation_config).__name__}"
        )
    return (GenerationConfig() if generation_config is None else generation_config).update(**kwargs)


@torch.inference_mode()
def stream_tokens(
    model: MMGPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    images: torch.Tensor | None = None, **kwargs: Any,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy or sampled decoding, one step at a time; ``generate`` collects these steps.

    Args:
        model, input_ids, attention_mask, images: as ``generate``.
        **kwargs: as ``generate``: ``image_embeds``, ``generation_config``, ``generator``, ``tokenizer``,
            ``prefix_cache`` and any ``GenerationConfig`` field (no beam search: its best sequence is only known at
            the end).

    Yields:
        Per step, ``(rows, tokens)``: the output rows (of ``B * num_return_sequences``, grouped per prompt)
        still running, and the token each appended. A row that emits an eos token or completes a stop string
        yields that token last.

    From the first step until the iterator is exhausted, closed or raises, it holds the model (see ``generate``):
    close an iterator you do not finish.
    """
    image_embeds, config, generator, tokenizer, prefix_cache = _call_options(**kwargs)
    if config.num_beams > 1:
        raise ValueError("stream_tokens writes tokens as they come: num_beams must be 1 (use generate for beams)")
    yield from _stream(
        model, input_ids, attention_mask, images, image_embeds, config, generator, tokenizer, prefix_cache
    )


def _call_options(
    image_embeds: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    prefix_cache: PrefixCache | None = None,
    **kwargs: Any,
) -> tuple[
    torch.Tensor | None, GenerationConfig, torch.Generator | None, PreTrainedTokenizerBase | None, PrefixCache | None
]:
    return image_embeds, resolve_generation_config(generation_config, **kwargs), generator, tokenizer, prefix_cache


def _stream(
    model: MMGPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images: torch.Tensor | None,
    image_embeds: torch.Tensor | None, config: GenerationConfig, generator: torch.Generator | None,
    tokenizer: PreTrainedTokenizerBase | None, prefix_cache: PrefixCache | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    batch = ContinuousBatch(model, config, generator=generator, tokenizer=tokenizer, prefix_cache=prefix_cache)
    if config.max_new_tokens == 0:
        return
    # One batch that no row joins: the rows are 0 .. B * n - 1, and each leaves when it ends.
    with batch:
        batch.add(input_ids, attention_mask, images, image_embeds)
        while batch:
            rows, tokens, _ = batch.step()
            yield rows, tokens


@torch.inference_mode()
def generate(
    model: MMGPT,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    *,
    image_embeds: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    prefix_cache: PrefixCache | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Generate continuations for a left-padded batch.

    Args:
        model: the model (put it in eval mode first). Its decoder holds the KV cache, so generations on one model
            take turns: a call from another thread waits for the running one (and returns what it would return
            alone); a call from a thread that holds an unfinished ``stream_tokens`` on it raises ``RuntimeError``.
        input_ids: ``(B, T)`` prompts, left-padded.
        attention_mask: ``(B, T)``, 1 on real tokens, 0 on padding; ``None`` = no padding.
        images: ``(N, 3, H, W)`` for the ``<image>`` placeholders, in order; or ``image_embeds``
            ``(N, image_seq_len, n_embd)`` from ``model.encode_images``, to encode an image once for many
            prompts.
        generation_config: how to decode (default ``GenerationConfig()``: greedy, 32 new tokens).
        generator: a seeded ``torch.Generator`` for reproducible sampling.
        tokenizer: decodes the output for ``stop_strings``.
        prefix_cache: a ``PrefixCache``: a one-row prompt (no padding) prefills only what follows its longest
            cached prefix, and leaves its own cache there (``mmgpt.generation.prefix_cache``). Not with beams.
        **kwargs: any ``GenerationConfig`` field, overriding ``generation_config``'s (``max_new_tokens=8``,
            ``do_sample=True``, ...); anything else is a ``TypeError`` naming it.

    Returns:
        ``(B * num_return_sequences, max_new_tokens)`` new token ids (``pad_token_id`` after a row's end); rows
        ``i * n ... i * n + n - 1`` belong to prompt ``i``. The ids still hold a stop string;
        ``mmgpt.generation.stopping.cut_at_stop_string`` removes it from the text.
    """
    config = resolve_generation_config(generation_config, **kwargs)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    if config.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, images, image_embeds, config, pad)
    B = input_ids.size(0)
    out = torch.full((B * config.num_return_sequences, config.max_new_tokens), pad, dtype=torch.long,
                     device=input_ids.device)
    steps = _stream(
        model, input_ids, attention_mask, images, image_embeds, config, generator, tokenizer, prefix_cache
    )
    # Closed however the loop ends (an interrupt included), so the model's KV cache and lock are freed at once.
    with contextlib.closing(steps):
        for step, (rows, tokens) in enumerate(steps):
            out[rows, step] = tokens
    return out
