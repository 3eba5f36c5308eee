"""``data.on_bad_sample: skip``: a sample whose image cannot be used leaves its batch with a warning, not the run.

Images are opened lazily, one sample at a time, so a missing, corrupt, oversized or misencoded image surfaces
hours into a run. With ``skip`` the dataset hands back a ``BadSample`` in its place (``SkipBadImages``) and the
collate function drops it, logs where it was and why, and counts it in ``batch["skipped"]`` (``SkippingCollate``).
Only images are skipped: records are all parsed when a dataset is built, so a malformed one stops the run before
its first step, where it is one edit to fix, instead of quietly shrinking the data.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from mmgpt.data.sample import Sample
from mmgpt.models.image_processor import BadImageError

log = logging.getLogger(__name__)


@dataclass
class BadSample:
    """A sample that could not be loaded: its dataset index and why (the error names the file, line or id)."""

    index: int
    reason: str


class SkipBadImages(Dataset):
    """A dataset whose items fail with ``BadImageError`` come back as ``BadSample``; every other error is raised.

    Args:
        dataset: the dataset to wrap.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Sample | BadSample:
        try:
            return self.dataset[i]
        except BadImageError as e:  # a missing file is one too (ImageNotFoundError)
            return BadSample(i, str(e))


class SkippingCollate:
    """Collate the good samples of a batch, dropping and counting the ``BadSample``s.

    With ``refill=True`` (training) every dropped sample is replaced by one drawn from the dataset, so the batch
    keeps its size and a batch that was bad throughout still trains; the draws are seeded by the bad indices, so a
    rerun draws the same replacements. Evaluation does not refill: a replacement would score some samples twice.

    Args:
        collate: builds the batch from samples (a ``Collator``).
        dataset: the ``SkipBadImages`` the batch's items come from (replacements are drawn from it).
        refill: replace dropped samples (training) or only drop them (evaluation).
        max_draws: replacements drawn per batch at most: when the source is broken throughout (a wrong image
            folder), an error says so instead of reading the whole dataset for every batch.
    """

    def __init__(
        self, collate: Callable[[Sequence[Sample]], dict], dataset: SkipBadImages, refill: bool, max_draws: int = 64
    ) -> None:
        self.collate, self.dataset, self.refill, self.max_draws = collate, dataset, refill, max_draws

    def __call__(self, items: Sequence[Sample | BadSample]) -> dict:
        good = [s for s in items if not isinstance(s, BadSample)]
        bad = [s for s in items if isinstance(s, BadSample)]
        for b in bad:
            _warn(b)
        draws = 0
        if self.refill and bad:
            rng = random.Random(bad[0].index)
            while len(good) < len(items) and draws < self.max_draws:
                draws += 1
                item = self.dataset[rng.randrange(len(self.dataset))]
                if isinstance(item, BadSample):
                    _warn(item)
                    bad.append(item)
                else:
                    good.append(item)
        if not good:
            drawn = f" and the {draws} replacements drawn for them" if draws else ""
            raise ValueError(
                f"every sample of this batch ({len(items)}){drawn} had an unusable image; data.on_bad_sample=skip "
                f"drops some bad samples, but a batch needs at least one good one. Check the sources' image folders. "
                f"The last: {bad[-1].reason}"
            )
        batch = self.collate(good)
        batch["skipped"] = len(bad)  # logged by the LightningModule as train/skipped_samples
        return batch


def _warn(bad: BadSample) -> None:
    log.warning("data.on_bad_sample=skip: skipped dataset item %d: %s", bad.index, bad.reason)
