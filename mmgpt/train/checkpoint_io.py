"""``SafeCheckpointIO``: how the Trainer reads checkpoints when it trains an ``MMGPTModule``, however it was built.

Lightning's own reader fetches a URL ``ckpt_path`` and unpickles it with ``weights_only=False``; the CLI refuses
such paths, but a ``Trainer`` used directly would not. ``MMGPTModule.setup`` puts this reader in front of the
strategy's, so every ``ckpt_path`` is a local file read as plain data.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from mmgpt.checkpoint import local_path


class SafeCheckpointIO(CheckpointIO):
    """Wraps the strategy's ``CheckpointIO``: saving goes to it unchanged; loading takes local paths only, with
    ``weights_only=True``. (Non-finite weights are refused by ``MMGPTModule.on_load_checkpoint``, which every
    Lightning load passes through.)"""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise ValueError("weights_only=False: mmgpt checkpoints are plain data and load without pickle code")
        path = local_path(path, "ckpt_path")
        kwargs = {} if map_location is None else {"map_location": map_location}
        return self.inner.load_checkpoint(path, weights_only=True, **kwargs)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
