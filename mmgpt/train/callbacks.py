"""Training callbacks the shipped configs use."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for ``every_n_train_steps`` saves that also saves ``last.ckpt`` when training ends.

    Lightning's own saves ``last.ckpt`` at the end of training only if it has never saved before: with saves every
    N steps, a run whose length is not a multiple of N (``--trainer.max_steps`` overridden, ``max_epochs`` reached
    first) would silently lose the steps after the last multiple.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        # Skipped when this step is saved already, and where Lightning skips saves (fast_dev_run, not fitting).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
