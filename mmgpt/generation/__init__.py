"""Generation: ``GenerationConfig``, the sampling functions, stop strings, the KV-cached decode state, greedy /
sampled / streamed decoding (``engine``), beam search, and int8 weights for the decode step (``quantize``)."""

from mmgpt.generation.config import GenerationConfig
from mmgpt.generation.engine import generate, stream_tokens

__all__ = ["GenerationConfig", "generate", "stream_tokens"]
