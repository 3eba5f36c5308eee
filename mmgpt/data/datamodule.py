"""``MMGPTDataModule``: the built-in shapes data or real data on disk, as Lightning dataloaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning as L
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from mmgpt.convert.hf_vlm import load_model_tokenizer
from mmgpt.data.bad_samples import SkipBadImages, SkippingCollate
from mmgpt.data.collate import Collator
from mmgpt.data.length_grouped import LengthGroupedSampler
from mmgpt.data.sample import TASKS, Task
from mmgpt.data.scenes import ShapesConfig
from mmgpt.data.shapes import (
    DEFAULT_QA_PER_SCENE,
    DEFAULT_QA_TURNS,
    DEFAULT_SCENES,
    DEFAULT_TEXT_FRACTION,
    ShapesDataset,
)
from mmgpt.data.shapes_language import QTYPES, QType
from mmgpt.data.sources import CocoCaptions, Conversations, Mixture, TextFile, VQAJsonl
from mmgpt.models.anyres import AnyresImageProcessor
from mmgpt.models.image_processor import ImageProcessor
from mmgpt.models.image_tiling import TilingImageProcessor
from mmgpt.tokenizer import DEFAULT_TOKENIZER


@dataclass
class DataSource:
    """One source of samples for a split.

    ``kind="shapes"`` needs nothing else (``size`` scenes of the split, generated on the fly); ``"coco"`` needs
    ``path`` (annotations JSON) and ``images`` (folder); ``"vqa"`` needs ``path`` (JSONL) and optionally
    ``images`` (root for relative image paths); ``"text"`` needs ``path`` (.txt or .jsonl); ``"conversations"``
    needs ``path`` (LLaVA-format .json/.jsonl) and optionally ``images``.
    """

    kind: Literal["shapes", "coco", "vqa", "text", "conversations"] = "shapes"
    path: str | None = None
    images: str | None = None
    # Relative sampling weight in a mixture of several sources.
    weight: float = 1.0
    # shapes: number of scenes (each gives a caption, qa_per_scene questions and text-only samples).
    size: int = DEFAULT_SCENES
    # shapes: questions per scene.
    qa_per_scene: int = DEFAULT_QA_PER_SCENE
    # shapes: share of text-only samples.
    text_fraction: float = DEFAULT_TEXT_FRACTION
    # shapes: questions per VQA sample. 1: one question each; more: multi-turn conversations (LLaVA-1.5's
    # grouping), several answers for one pass over the image, system prompt and template.
    qa_turns: int = DEFAULT_QA_TURNS
    # shapes: which kinds of sample a scene gives (caption, vqa, text) and which question types it asks; a second
    # source of only the hard question types adds practice on them without dropping the rest.
    tasks: tuple[Task, ...] = TASKS
    qtypes: tuple[QType, ...] = QTYPES

    def build(self, split: str, shapes: ShapesConfig) -> Dataset:
        if self.kind == "shapes":
            return ShapesDataset(
                split, self.size, shapes, qa_per_scene=self.qa_per_scene, text_fraction=self.text_fraction,
                qa_turns=self.qa_turns, tasks=self.tasks, qtypes=self.qtypes,
            )
        if self.path is None:
            raise ValueError(f"data source kind={self.kind!r} needs a path")
        if self.kind == "coco":
            if self.images is None:
                raise ValueError(f"data source kind='coco' ({self.path}) needs images: the image folder")
            return CocoCaptions(self.path, self.images)
        if self.kind == "vqa":
            return VQAJsonl(self.path, image_root=self.images)
        if self.kind == "conversations":
            return Conversations(self.path, image_root=self.images)
        return TextFile(self.path)


def _default_train() -> list[DataSource]:
    return [DataSource("shapes", size=4000)]


def _default_eval() -> list[DataSource]:
    return [DataSource("shapes", size=100)]


class MMGPTDataModule(L.LightningDataModule):
    """Data for ``MMGPTModule``.

    Args:
        tokenizer: tokenizer directory; linked to ``model.tokenizer`` by the CLI so both always agree. A saved HF
            SmolVLM/Idefics3, PaliGemma or LLaVA-OneVision directory gives its own tokenizer with its processor's chat
            template (or PaliGemma's prompt format); the CLI sets it to ``model.init_from`` when that is such a
            directory.
        train, val, test: the sources of each split; several sources are mixed by their weights.
        shapes: the procedural shape world (used by ``kind: shapes`` sources).
        batch_size: samples per batch (per device).
        max_length: longest sequence in tokens, image placeholders included.
        num_workers: dataloader worker processes; 0 loads in the main process.
        mixture_length: samples per epoch of a weighted mixture (default: the sources' total length).
        seed: seeds the mixture's draws (and the length-grouped order).
        group_by_length: batch training samples of similar length together (HF Trainer's ``group_by_length``):
            rows are padded to their batch's longest, so mixed batches of long captions and short answers spend
            about half of each step on padding. Needs sources that estimate lengths (shapes does).
        packing: pack each training batch's samples into as few rows of ``max_length`` tokens as fit (TRL's
            ``packing``), each sample attending only to itself: the same loss and gradients as padded rows,
            with none of the padding's compute, and every task still in every batch.
        on_bad_sample: what a sample whose image cannot be used (missing, corrupt, over PIL's size limit, or with
            pixels mmgpt refuses) does when its batch is loaded: ``"error"`` stops with an error naming its file
            and line (or id); ``"skip"`` drops it from its batch with a logged warning naming the same, counts it
            in ``batch["skipped"]``, and in training draws a replacement (``mmgpt.data.bad_samples``). Malformed
            records are errors either way, found when the dataset is built.
        processor, image_seq_len: set from the model (the CLI links them); needed before the dataloaders. A tiling
            processor (SmolVLM's) makes each picture its tiles and a global view, as the HF processor does; an anyres
            one (LLaVA-OneVision's, with ``image_seq_len`` 0) its tiles and the placeholder count of its size.
    """

    def __init__(
        self,
        tokenizer: str = str(DEFAULT_TOKENIZER),
        train: list[DataSource] | None = None,
        val: list[DataSource] | None = None,
        test: list[DataSource] | None = None,
        shapes: ShapesConfig | None = None,
        batch_size: int = 32,
        max_length: int = 256,
        num_workers: int = 0,
        mixture_length: int | None = None,
        seed: int = 0,
        group_by_length: bool = False,
        packing: bool = False,
        on_bad_sample: Literal["error", "skip"] = "error",
        processor: ImageProcessor | TilingImageProcessor | AnyresImageProcessor | None = None,
        image_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample={on_bad_sample!r}; expected 'error' or 'skip'")
        if mixture_length is not None and mixture_length < 1:
            raise ValueError(
                f"data.mixture_length={mixture_length}; expected a positive number of samples per epoch, or null "
                f"for the sources' total"
            )
        self.tokenizer_path = tokenizer
        self.sources = {
            "train": train if train is not None else _default_train(),
            "val": val if val is not None else _default_eval(),
            "test": test if test is not None else _default_eval(),
        }
        self.shapes = shapes or ShapesConfig()
        self.batch_size, self.max_length, self.num_workers = batch_size, max_length, num_workers
        self.mixture_length, self.seed, self.group_by_length = mixture_length, seed, group_by_length
        self.packing, self.on_bad_sample = packing, on_bad_sample
        self.processor, self.image_seq_len = processor, image_seq_len
        self.tokenizer = load_model_tokenizer(tokenizer)
        self.datasets: dict[str, Dataset] = {}

    def dataset(self, split: str) -> Dataset:
        """The (cached) dataset of a split, mixing its sources by weight when there are several."""
        if split not in self.datasets:
            sources = self.sources[split]
            if not sources:
                raise ValueError(f"data.{split} has no sources: list at least one, e.g. [{{kind: shapes}}]")
            parts = [s.build(split, self.shapes) for s in sources]
            for k, (source, part) in enumerate(zip(sources, parts, strict=True)):
                # An empty source is a wrong path, an empty export or size: 0: an error now, not a mixture that
                # silently never draws from it or an epoch of no steps.
                if len(part) == 0:
                    what = f"size={source.size}" if source.kind == "shapes" else f"{source.path} holds no records"
                    raise ValueError(
                        f"data.{split}[{k}] (kind {source.kind!r}) gives no samples: {what}. Give it samples or "
                        f"remove it"
                    )
            if len(parts) == 1:
                self.datasets[split] = parts[0]
            elif split == "train":
                length = self.mixture_length or sum(len(p) for p in parts)
                self.datasets[split] = Mixture(parts, [s.weight for s in sources], length, self.seed)
            else:
                # Evaluation sees every sample of every source exactly once: weights are for training draws.
                self.datasets[split] = ConcatDataset(parts)
        return self.datasets[split]

    def collator(self, mode: Literal["train", "generate"] = "train", pack: bool = False) -> Collator:
        if self.processor is None or self.image_seq_len is None:
            raise RuntimeError(
                "MMGPTDataModule needs the model's image processor and image_seq_len; the CLI links them "
                "from the model — in Python pass processor=model.processor, "
                "image_seq_len=mmgpt.data.collate.image_seq_len_for(model)"
            )
        return Collator(self.tokenizer, self.processor, self.image_seq_len, self.max_length, mode, pack=pack)

    def _loader(
        self, split: str, shuffle: bool, mode: Literal["train", "generate"] = "train", sampler=None,
        pack: bool = False,
    ) -> DataLoader:
        dataset, collate = self.dataset(split), self.collator(mode, pack)
        if self.on_bad_sample == "skip":
            dataset = SkipBadImages(dataset)
            collate = SkippingCollate(collate, dataset, refill=split == "train")
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle and sampler is None,
            sampler=sampler, num_workers=self.num_workers, collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if not self.group_by_length:
            return self._loader("train", shuffle=True, pack=self.packing)
        dataset = self.dataset("train")
        if not hasattr(dataset, "lengths"):
            raise ValueError(
                f"data.group_by_length needs length estimates, which {type(dataset).__name__} does not give "
                f"(shapes sources and mixtures of them do); set data.group_by_length=false"
            )
        return self._loader("train", shuffle=True, pack=self.packing, sampler=LengthGroupedSampler(
            dataset.lengths(), self.batch_size, seed=self.seed
        ))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        # Prediction generates answers for the test split from prompts alone.
        return self._loader("test", shuffle=False, mode="generate")
