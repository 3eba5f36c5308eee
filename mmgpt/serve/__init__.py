"""``mmgpt serve``: an OpenAI-compatible chat completions server that decodes concurrent requests in batches.

``create_app(pipeline)`` builds the FastAPI app (``mmgpt.serve.app``); ``mmgpt serve`` (``mmgpt.commands.serve``)
runs it with uvicorn.
"""

from typing import TYPE_CHECKING

from mmgpt._lazy import lazy_exports

# Imported on first use: `import mmgpt.serve` loads neither FastAPI nor torch.
_EXPORTS = {"create_app": "mmgpt.serve.app", "Batcher": "mmgpt.serve.batcher"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from mmgpt.serve.app import create_app
    from mmgpt.serve.batcher import Batcher
