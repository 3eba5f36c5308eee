"""Data: the built-in shapes scenes, loaders for real data on disk, collation and the LightningDataModule."""

from typing import TYPE_CHECKING

from mmgpt._lazy import lazy_exports

# Imported on first use: collation (which inference uses too) does not load Lightning with the datamodule.
_EXPORTS = {
    "IGNORE_INDEX": "mmgpt.data.collate", "Collator": "mmgpt.data.collate", "DataSource": "mmgpt.data.datamodule",
    "MMGPTDataModule": "mmgpt.data.datamodule", "Sample": "mmgpt.data.sample", "ShapesConfig": "mmgpt.data.scenes",
    "ShapesDataset": "mmgpt.data.shapes", "CocoCaptions": "mmgpt.data.sources", "Conversations": "mmgpt.data.sources",
    "Mixture": "mmgpt.data.sources", "TextFile": "mmgpt.data.sources", "VQAJsonl": "mmgpt.data.sources",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from mmgpt.data.collate import IGNORE_INDEX, Collator
    from mmgpt.data.datamodule import DataSource, MMGPTDataModule
    from mmgpt.data.sample import Sample
    from mmgpt.data.scenes import ShapesConfig
    from mmgpt.data.shapes import ShapesDataset
    from mmgpt.data.sources import CocoCaptions, Conversations, Mixture, TextFile, VQAJsonl
