"""Data: the built-in shapes scenes, loaders for real data on disk, collation and the LightningDataModule."""

from mmgpt.data.collate import IGNORE_INDEX, Collator
from mmgpt.data.datamodule import DataSource, MMGPTDataModule
from mmgpt.data.sample import Sample
from mmgpt.data.scenes import ShapesConfig
from mmgpt.data.shapes import ShapesDataset
from mmgpt.data.sources import CocoCaptions, Conversations, Mixture, TextFile, VQAJsonl

__all__ = [
    "IGNORE_INDEX", "Collator", "DataSource", "MMGPTDataModule", "Sample", "ShapesConfig", "ShapesDataset",
    "CocoCaptions", "Conversations", "Mixture", "TextFile", "VQAJsonl",
]
