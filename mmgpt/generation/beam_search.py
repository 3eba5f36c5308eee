"""Beam search: HF's vectorized algorithm (transformers ``GenerationMixin._beam_search``) on the static KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmgpt.generation.config import GenerationConfig
from mmgpt.generation.decode_state import DecodeState
from mmgpt.generation.sampling import apply_repetition_penalty
from mmgpt.models.mmgpt import MMGPT


def beam_search(
    model: MMGPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images: torch.Tensor | None,
    image_embeds: torch.Tensor | None, config: GenerationConfig, pad: int,
) -> torch.Tensor:
    """The ``num_beams`` best sequences per prompt; ``generate`` calls this when ``config.num_beams > 1``.

    Per prompt, ``num_beams`` running sequences and the ``num_beams`` best finished ones. Each step takes the
    top ``K = max(2, 1 + n_eos) * num_beams`` continuations of all running beams by summed log-probability;
    those among the first ``num_beams`` that end (eos, or the length limit) become finished candidates scored
    ``sum_logprobs / generated_length ** length_penalty``; the best unfinished ones run on.

    Returns:
        ``(B * num_return_sequences, max_new_tokens)`` token ids, ``pad`` after each sequence's end.
    """
    n_return = config.num_return_sequences
    B, N, nb = input_ids.size(0), config.max_new_tokens, config.num_beams
    device = input_ids.device
    if N == 0:
        return torch.empty(B * n_return, 0, dtype=torch.long, device=device)
    with DecodeState(
        model, input_ids, attention_mask, N, compile=config.compile, track_seen=config.repetition_penalty != 1.0
    ) as state:
        logits = state.prefill(images, image_embeds)  # (B, V)
        V = logits.size(-1)
        eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=device)
        K = min(max(2, 1 + eos.numel()) * nb, nb * V)
        top_nb = torch.arange(K, device=device) < nb  # (K,): only these candidates may finish
        offsets = torch.arange(B, device=device)[:, None] * nb  # (B, 1): first row of each prompt's beams
        copies = torch.arange(B, device=device).repeat_interleave(nb)  # one prefill, nb copies
        state.select(copies)
        logits = logits[copies]  # (B * nb, V)
        NEG = -1.0e9  # HF's "impossible" score; -inf would turn into NaN in the sums below
        # Only beam 0 starts live, so the first step does not pick the same token nb times.
        running_scores = torch.zeros(B, nb, device=device)
        running_scores[:, 1:] = NEG
        running = torch.full((B, nb, N), pad, dtype=torch.long, device=device)
        finished = running.clone()
        finished_scores = torch.full((B, nb), NEG, device=device)
        is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
        may_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
        for step in range(N):
            logp = F.log_softmax(logits.float(), dim=-1)
            logp = apply_repetition_penalty(logp, state.seen, config.repetition_penalty)
            scores = (logp.view(B, nb, V) + running_scores[..., None]).view(B, nb * V)
            top_scores, top_index = scores.topk(K, dim=-1)  # (B, K)
            parent, token = top_index // V, top_index % V
            candidates = running.gather(1, parent[..., None].expand(B, K, N)).clone()  # (B, K, N)
            candidates[:, :, step] = token
            ends = torch.isin(token, eos) | (step == N - 1)  # (B, K): eos, or the length limit
            # The best num_beams candidates that did not end run on.
            live_scores = top_scores + ends.float() * NEG
            keep = live_scores.topk(nb, dim=-1).indices  # (B, nb)
            running = candidates.gather(1, keep[..., None].expand(B, nb, N))
            running_scores = live_scores.gather(1, keep)
            parent = parent.gather(1, keep)
            # Ended candidates among the top num_beams compete with the finished ones, length-normalized.
            new_finished = ends & top_nb
            normalized = top_scores / (step + 1) ** config.length_penalty
            full = is_finished.all(dim=-1, keepdim=True) & (config.early_stopping is True)
            normalized = normalized + (full | ~may_improve | ~new_finished).float() * NEG
            merged_scores = torch.cat([finished_scores, normalized], dim=1)  # (B, nb + K)
            best = merged_scores.topk(nb, dim=-1).indices
            finished = torch.cat([finished, candidates], dim=1).gather(1, best[..., None].expand(B, nb, N))
            finished_scores = merged_scores.gather(1, best)
            is_finished = torch.cat([is_finished, new_finished], dim=1).gather(1, best)
            # Can a running beam still beat the worst finished one? "never" bounds it exactly: with a positive
            # length_penalty the best case is the longest sequence, otherwise the current length.
            best_length = N if (config.early_stopping == "never" and config.length_penalty > 0) else step + 1
            best_running = running_scores[:, :1] / best_length**config.length_penalty
            worst = torch.where(is_finished, finished_scores.min(dim=-1, keepdim=True).values, NEG)
            may_improve &= (best_running > worst).any(dim=-1, keepdim=True)
            if (
                not bool(may_improve.any())
                or (config.early_stopping is True and bool(is_finished.all()))
                or bool(ends.all())
            ):
                break
            # Each beam continues from its parent's cache row.
            state.select((parent + offsets).flatten())
            logits = state.step(running[:, :, step].flatten())
        return finished[:, :n_return].reshape(B * n_return, N)
