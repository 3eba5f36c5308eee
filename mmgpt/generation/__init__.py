"""Generation: ``GenerationConfig``, the sampling functions, stop strings, the KV-cached decode state, greedy /
sampled / streamed decoding (``engine``) on a batch that rows join and leave (``continuous_batch``), beam search,
the prompt-prefix KV cache a chat's turns share (``prefix_cache``), int8 weights for the decode step
(``quantize``), and the float32 matmul kernel of CPU decode steps (``f32_gemm``)."""

from typing import TYPE_CHECKING

from mmgpt._lazy import lazy_exports

# Imported on first use, so that GenerationConfig alone needs no torch.
_EXPORTS = {
    "GenerationConfig": "mmgpt.generation.config", "generate": "mmgpt.generation.engine",
    "stream_tokens": "mmgpt.generation.engine", "apply_repetition_penalty": "mmgpt.generation.sampling",
    "sample": "mmgpt.generation.sampling", "warp_logits": "mmgpt.generation.sampling",
    "cut_at_stop_string": "mmgpt.generation.stopping", "PrefixCache": "mmgpt.generation.prefix_cache",
    "ContinuousBatch": "mmgpt.generation.continuous_batch",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from mmgpt.generation.config import GenerationConfig
    from mmgpt.generation.continuous_batch import ContinuousBatch
    from mmgpt.generation.engine import generate, stream_tokens
    from mmgpt.generation.prefix_cache import PrefixCache
    from mmgpt.generation.sampling import apply_repetition_penalty, sample, warp_logits
    from mmgpt.generation.stopping import cut_at_stop_string
