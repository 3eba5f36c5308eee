"""mmgpt: small multimodal GPTs — a timm ViT, a projector and a causal decoder, trained with Lightning."""

from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
from mmgpt.factory import create_model
from mmgpt.generation.config import GenerationConfig
from mmgpt.models.mmgpt import MMGPT
from mmgpt.pipeline import ImageEmbedding, Pipeline, generate, load

__all__ = [
    "MMGPT", "MMGPTConfig", "VisionConfig", "ProjectorConfig", "DecoderConfig", "GenerationConfig", "ImageEmbedding",
    "Pipeline", "create_model", "generate", "load",
]
__version__ = "0.1.0"
