"""mmgpt: small multimodal GPTs — a timm ViT, a projector and a causal decoder, trained with Lightning."""

from typing import TYPE_CHECKING

from mmgpt._lazy import lazy_exports

__version__ = "0.1.0"

# Imported on first use: training (mmgpt.train) never loads the inference layer, and a config stays torch-free.
_EXPORTS = {
    "DecoderConfig": "mmgpt.config", "MMGPTConfig": "mmgpt.config", "ProjectorConfig": "mmgpt.config",
    "VisionConfig": "mmgpt.config", "GenerationConfig": "mmgpt.generation.config", "MMGPT": "mmgpt.models.mmgpt",
    "create_model": "mmgpt.factory", "ImageEmbedding": "mmgpt.pipeline", "Pipeline": "mmgpt.pipeline",
    "generate": "mmgpt.pipeline", "load": "mmgpt.pipeline",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig
    from mmgpt.factory import create_model
    from mmgpt.generation.config import GenerationConfig
    from mmgpt.models.mmgpt import MMGPT
    from mmgpt.pipeline import ImageEmbedding, Pipeline, generate, load
