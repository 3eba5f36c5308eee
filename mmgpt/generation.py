"""Autoregressive generation: one prefill over image + prompt, then one KV-cached step per token.

Batches are left-padded: every row's last prompt token sits in the same cache slot, so one decode step serves
all rows. Each row's RoPE positions start at its first real token, and padding is masked out of attention, so a
row generates exactly what it would generate alone.
"""

from __future__ import annotations

import torch

from mmgpt.model import MMGPT


def sample(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token for each row.

    Args:
        logits: ``(B, V)`` next-token logits.
        do_sample: False picks the argmax (greedy), as HF ``generate``'s default.
        temperature: divides the logits before sampling; lower is more deterministic.
        top_k: keep only the k most likely tokens.
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling).
        generator: a seeded ``torch.Generator`` for reproducible sampling.

    Returns:
        ``(B,)`` token ids.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass *before* it already reaches top_p; the most likely token always stays.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def build_attention_mask(key_valid: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """The one place attention masks are made: causal over slots, padding keys hidden.

    Args:
        key_valid: ``(B, S)`` bool, False at left-padding slots.
        query_slots: ``(T,)`` the slots the queries sit in.

    Returns:
        ``(B, 1, T, S)`` bool, True = may attend. A padding query attends to itself so that no row of the
        softmax is empty (an all-masked row gives NaN); its output is never used.
    """
    S = key_valid.size(1)
    slots = torch.arange(S, device=key_valid.device)
    causal = slots[None, :] <= query_slots[:, None]  # (T, S)
    self_slot = slots[None, :] == query_slots[:, None]  # (T, S)
    return ((causal[None] & key_valid[:, None, :]) | self_slot[None]).unsqueeze(1)


@torch.inference_mode()
def generate(
    model: MMGPT,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    *,
    image_embeds: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Generate continuations for a left-padded batch.

    Args:
        model: the model (put it in eval mode first).
        input_ids: ``(B, T)`` prompts, left-padded.
        attention_mask: ``(B, T)``, 1 on real tokens, 0 on padding; ``None`` = no padding.
        images: ``(N, 3, H, W)`` for the ``<image>`` placeholders, in order; or ``image_embeds``.
        max_new_tokens: how many tokens to generate at most.
        eos_token_id: a row stops after emitting it; later positions hold ``pad_token_id``.
        use_cache: False re-runs the full sequence each step (slow; the reference the cache is tested against).
        do_sample, temperature, top_k, top_p, generator: see ``sample``.

    Returns:
        ``(B, max_new_tokens)`` new token ids (``pad_token_id`` after a row's eos).
    """
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    total = T + max_new_tokens
    block_size = model.config.decoder.block_size
    if total > block_size:
        raise ValueError(
            f"prompt ({T} tokens, images included) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"decoder.block_size={block_size}; shorten the prompt or lower max_new_tokens"
        )
    if image_embeds is None and images is not None:
        image_embeds = model.encode_images(images)
    pad_len = T - attention_mask.sum(dim=1)  # (B,) left padding per row
    key_valid = torch.ones(B, total, dtype=torch.bool, device=device)
    key_valid[:, :T] = attention_mask.bool()
    slots = torch.arange(total, device=device)
    position_ids = (slots[None, :] - pad_len[:, None]).clamp(min=0)  # (B, total): real tokens start at 0

    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    x = model.embed(input_ids, image_embeds=image_embeds)  # (B, T, C)
    if use_cache:
        model.decoder.set_kv_cache(B, total, device=device, dtype=x.dtype)
    try:
        input_pos = slots[:T]
        for step in range(max_new_tokens):
            if use_cache:
                logits = model.decoder(
                    inputs_embeds=x, input_pos=input_pos, position_ids=position_ids[:, input_pos],
                    attn_mask=build_attention_mask(key_valid, input_pos),
                )
            else:
                seen = slots[: T + step]
                logits = model.decoder(
                    inputs_embeds=x, position_ids=position_ids[:, seen],
                    attn_mask=build_attention_mask(key_valid[:, : T + step], seen),
                )
            token = sample(logits[:, -1], **sampling)  # (B,)
            token = token.masked_fill(finished, pad_token_id)
            out[:, step] = token
            if eos_token_id is not None:
                finished |= token == eos_token_id
                if bool(finished.all()):
                    break
            next_embeds = model.decoder.wte(token[:, None])  # (B, 1, C)
            if use_cache:
                x, input_pos = next_embeds, slots[T + step : T + step + 1]
            else:
                x = torch.cat([x, next_embeds], dim=1)
    finally:
        if use_cache:
            model.decoder.clear_kv_cache()
    return out
