"""``MMGPTModule``: the training system around ``MMGPT`` — loss, logging, optimizer groups, schedule, freezing.

The model knows nothing of Lightning; this module knows nothing of the model's tensor internals beyond
``forward`` returning logits and the three named components ``vision``, ``projector``, ``decoder``.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from mmgpt.checkpoint import (
    add_to_lightning_checkpoint,
    load_checkpoint,
    load_weights,
    local_path,
    tokenizer_from_lightning_checkpoint,
)
from mmgpt.config import DecoderConfig, MMGPTConfig, ProjectorConfig, VisionConfig, config_from_dict
from mmgpt.convert.hf_vlm import hf_vlm_family
from mmgpt.data.collate import image_seq_len_for
from mmgpt.eval.evaluate import evaluate, predict_batch
from mmgpt.factory import create_model
from mmgpt.finite_weights import check_finite
from mmgpt.models.lora import LoRAConfig, apply_lora
from mmgpt.prompts import IMAGE
from mmgpt.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
from mmgpt.train.checkpoint_io import SafeCheckpointIO
from mmgpt.train.loss import LOSS_WEIGHTINGS, next_token_targets, summed_next_token_loss
from mmgpt.train.precision import slow_cpu_precision_warning

COMPONENTS = ("vision", "projector", "decoder")
# Parameters that are embeddings in all but module type (timm's position embeddings and prefix tokens):
# like nn.Embedding weights, they get no weight decay.
_EMBEDDING_NAMES = ("pos_embed", "cls_token", "reg_token")


def _as_config(cls, value):
    # The CLI gives dataclasses; a checkpoint's hparams give dicts (so it loads with weights_only=True).
    if isinstance(value, dict):
        return config_from_dict(cls, value, f"model.{cls.__name__}")
    return value if value is not None else cls()


# Images whose features fit projector.whiten: with 9+ tokens each, ~20k vectors for a few hundred dimensions, a
# covariance good to a few percent; a few seconds of the tower's forward on a CPU.
WHITENING_IMAGES = 2048


def _imported_model(
    init_from: str, tokenizer: str, vision: VisionConfig, projector: ProjectorConfig, decoder: DecoderConfig
):
    """``(model, tokenizer)`` of a saved HF vision-language model, converted to mmgpt's modules for training.

    Raises:
        ValueError: an architecture field or another tokenizer given beside it (the directory defines both).
    """
    given = [
        f"model.{name}" for name, value, default in (
            ("vision", vision, VisionConfig()), ("projector", projector, ProjectorConfig()),
            ("decoder", decoder, DecoderConfig()),
        ) if asdict(value) != asdict(default)
    ]
    if given:
        raise ValueError(
            f"init_from={init_from} is a saved HF {hf_vlm_family(init_from)} model, which defines the architecture; "
            f"{', '.join(given)} is set as well: remove it (and any --config that sets it)"
        )
    if str(tokenizer) not in (str(DEFAULT_TOKENIZER), str(init_from)):
        raise ValueError(
            f"init_from={init_from} is a saved HF model with its own tokenizer, but data.tokenizer={tokenizer}: leave "
            f"data.tokenizer unset (the CLI then uses init_from's) or set it to {init_from}"
        )
    try:
        model, tok = load_checkpoint(init_from)
    except (ValueError, FileNotFoundError) as e:
        raise (FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError)(f"init_from: {e}") from e
    return model.train(), tok


class MMGPTModule(L.LightningModule):
    """Trains an ``MMGPT``.

    Args:
        vision, projector, decoder: the model's components (``decoder.vocab_size`` comes from the tokenizer).
        tokenizer: tokenizer directory; the CLI links it from ``data.tokenizer``.
        lr: peak learning rate of every component without its own.
        vision_lr, projector_lr, decoder_lr: per-component peak learning rates (None: ``lr``).
        weight_decay: AdamW decay for matrices; norms, biases and embeddings get none.
        betas: AdamW betas; 0.95 as in GPT-3/Llama, steadier than 0.999 for short runs.
        warmup_steps: linear warmup, then cosine decay to ``min_lr_ratio * lr`` when training ends.
        min_lr_ratio: floor of the cosine schedule, as a fraction of the peak.
        lr_decay_steps: steps the schedule spans (nanoGPT's ``lr_decay_iters``); None: the whole run. Longer
            than the run, it stops part way down the cosine, as a longer run cut short would.
        freeze_vision, freeze_projector, freeze_decoder: keep a component's weights fixed. ``None`` (the default of
            the first two): frozen when ``init_from`` is a pretrained HF vision-language model, as HF's fine-tuning
            recipes keep its tower and projector (with ``lora`` only the adapters then train, and the adapter alone,
            ``mmgpt export --adapter-only``, is the whole fine-tune); trained otherwise.
        max_new_tokens: answer length for ``predict`` and generation-based validation.
        eval_every_n_validations: every this many validation runs, also generate answers for a fixed subset
            of the validation set and log caption/VQA/text scores next to the loss (0 disables).
        eval_samples: size of that subset (the first samples of the validation set, so runs compare).
        gradient_checkpointing: recompute the decoder blocks' activations in backward instead of storing them:
            less activation memory (bigger batches or longer sequences) for about a third more compute.
        compile: ``torch.compile`` the model's forward for training steps (graphs with dynamic shapes, so packed
            batches of any size reuse them); validation, generation and export run the plain model. Pays a one-time
            compile (tens of seconds on a CPU) for faster steps: 1.2x on the quickstart's CPU run.
        init_from: start from the weights of a trained model (a local ``.ckpt`` or exported directory; read without
            running code, and refused if a weight is NaN or inf), as a second training stage starts from the first;
            unlike ``ckpt_path`` it does not resume the optimizer or step. A saved HF SmolVLM/Idefics3, PaliGemma or
            LLaVA-OneVision directory (``mmgpt.load``'s) brings its whole architecture, tokenizer and image
            processor: leave ``vision``, ``projector`` and ``decoder`` unset, and the CLI gives the data its
            tokenizer.
        lora: train low-rank adapters (peft) in the decoder instead of its weights; they are merged into plain
            weights when the model is loaded for inference or exported.
        loss_weighting: ``"token"`` (the default, as LLaVA and HF): the training loss is the mean over every
            supervised token of the global batch, so a 25-token caption outweighs a one-word answer 25 to 1.
            ``"sample"``: the mean over samples of each one's token mean, so short answers (VQA) get an equal say.
            Validation loss and perplexity are always per token.
    """

    def __init__(
        self,
        vision: VisionConfig | None = None,
        projector: ProjectorConfig | None = None,
        decoder: DecoderConfig | None = None,
        tokenizer: str = str(DEFAULT_TOKENIZER),
        lr: float = 1e-3,
        vision_lr: float | None = None,
        projector_lr: float | None = None,
        decoder_lr: float | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        lr_decay_steps: int | None = None,
        freeze_vision: bool | None = None,
        freeze_projector: bool | None = None,
        freeze_decoder: bool = False,
        max_new_tokens: int = 32,
        eval_every_n_validations: int = 1,
        eval_samples: int = 100,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        init_from: str | None = None,
        lora: LoRAConfig | None = None,
        loss_weighting: str = "token",
    ) -> None:
        super().__init__()
        vision, projector = _as_config(VisionConfig, vision), _as_config(ProjectorConfig, projector)
        decoder = _as_config(DecoderConfig, decoder)
        lora = _as_config(LoRAConfig, lora) if lora is not None else None
        self.save_hyperparameters(ignore=["vision", "projector", "decoder", "lora"])
        # Plain dicts in hparams keep the checkpoint loadable with torch.load(weights_only=True).
        self.hparams.update(
            vision=asdict(vision), projector=asdict(projector), decoder=asdict(decoder),
            lora=asdict(lora) if lora else None,
        )
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={loss_weighting!r}; expected one of {list(LOSS_WEIGHTINGS)}")
        if lr_decay_steps is not None and lr_decay_steps < 1:
            raise ValueError(f"lr_decay_steps={lr_decay_steps}; expected a positive number of steps or None")
        if lora is not None and freeze_decoder:
            raise ValueError("lora trains adapters in the decoder: it cannot be combined with freeze_decoder=true")
        imported = hf_vlm_family(local_path(init_from, "init_from")) if init_from else None
        if imported:
            self.model, self.tokenizer = _imported_model(init_from, tokenizer, vision, projector, decoder)
        else:
            self.tokenizer = load_tokenizer(tokenizer)
            decoder = DecoderConfig(**{**asdict(decoder), "vocab_size": len(self.tokenizer)})
            config = MMGPTConfig(
                vision, projector, decoder, image_token_id=self.tokenizer.convert_tokens_to_ids(IMAGE)
            )
            # A pretrained LM is the point of hf_path, unless the weights come from an earlier stage.
            self.model = create_model(config, pretrained=bool(config.decoder.hf_path) and not init_from)
            if init_from:
                load_weights(self.model, init_from)
        projector = self.model.config.projector
        # A pretrained VLM's tower and projector already agree with its LM; a model assembled from parts has a
        # projector to learn.
        freeze_vision = bool(imported) if freeze_vision is None else freeze_vision
        freeze_projector = bool(imported) if freeze_projector is None else freeze_projector
        if gradient_checkpointing:
            self.model.decoder.gradient_checkpointing_enable()
        self.frozen = {"vision": freeze_vision, "projector": freeze_projector, "decoder": freeze_decoder}
        if projector.whiten and not freeze_vision:
            raise ValueError(
                "projector.whiten=True measures the vision features once, when training starts; a tower that trains "
                "would drift away from those statistics: set freeze_vision=True, or projector.whiten=False"
            )
        for name in COMPONENTS:
            if self.frozen[name]:
                getattr(self.model, name).requires_grad_(False)
        if lora is not None:
            apply_lora(self.model.decoder, lora)
        # A compiled bound method, not a module attribute: the parameters stay registered once, under `model.`,
        # so checkpoints and exports do not change; and only training steps go through the compiled graphs.
        self._train_forward = torch.compile(self.model.forward, dynamic=True) if compile else None
        self.val_loss = MeanMetric()
        self._validations = 0
        self._step_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses, until checked

    # Exposed for the CLI, which links them into the datamodule so images are processed as this model expects.
    @property
    def processor(self):
        return self.model.processor

    @property
    def image_seq_len(self) -> int:
        # 0 for an anyres model (LLaVA-OneVision), whose placeholder count depends on each picture's size: its
        # processor, linked with it, counts them.
        return image_seq_len_for(self.model)

    def forward(self, input_ids, images=None, **kwargs):
        return self.model(input_ids, images, **kwargs)

    def setup(self, stage: str) -> None:
        # Runs before the Trainer restores a ckpt_path: from here on it reads local files as plain data only.
        strategy = self.trainer.strategy
        if not isinstance(strategy.checkpoint_io, SafeCheckpointIO):
            strategy.checkpoint_io = SafeCheckpointIO(strategy.checkpoint_io)
        # A bf16 setting tuned on one CPU can be tens of times slower on another: say so before the first step.
        if self.trainer.strategy.root_device.type == "cpu":
            if message := slow_cpu_precision_warning(self.trainer.precision):
                rank_zero_warn(message)

    def on_train_start(self) -> None:
        projector = self.model.projector
        if projector.config.whiten and not bool(projector.whitened):
            self._fit_whitening()

    @torch.no_grad()
    def _fit_whitening(self) -> None:
        # The statistics come from the training data's own images through the frozen tower. Rank 0's are sent to
        # every rank, so the replicas stay identical under DDP/FSDP (each rank's loader sees other images).
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise ValueError("projector.whiten=True needs a LightningDataModule to draw training images from")
        projector, inputs, count = self.model.projector, [], 0
        was_training = self.model.vision.training
        self.model.vision.eval()
        for batch in datamodule.train_dataloader():
            if batch.get("images") is None:
                continue
            features = projector.mlp_inputs(self.model.vision(batch["images"].to(self.device)))
            inputs.append(features.flatten(0, 1).float())
            count += len(features)
            if count >= WHITENING_IMAGES:
                break
        self.model.vision.train(was_training)
        vectors = torch.cat(inputs) if inputs else torch.zeros(0, 0)
        if vectors.size(0) <= vectors.size(1):
            raise ValueError(
                f"projector.whiten=True: the training data gave {count} images, {vectors.size(0)} feature vectors of "
                f"width {vectors.size(1)}; fitting the whitening needs more vectors than the width: train on more "
                f"images, or set projector.whiten=False"
            )
        projector.fit_whitening(vectors)
        for name in ("whiten_mean", "whiten_matrix"):
            getattr(projector, name).copy_(self.trainer.strategy.broadcast(getattr(projector, name), src=0))
        rank_zero_info(f"projector.whiten: whitening fitted on the features of {count} training images")

    def summed_loss(self, batch: dict, per: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy summed over the units of ``per``, and how many units there are.

        ``per``: ``"token"`` or ``"sample"`` (see ``mmgpt.train.loss.summed_next_token_loss``).
        """
        # prefix_lengths: where image + prompt end, for decoder.attention="prefix" (ignored when causal).
        # position_ids and segment_ids come with packed rows (data.packing) and keep each sample to itself.
        forward = self.model
        if self.training and self._train_forward is not None:
            # The compiled graph skips forward's input checks (each a host sync): make them here, eagerly.
            self.model.check_inputs(batch["input_ids"], batch["images"], batch.get("position_ids"))
            forward = self._train_forward
        # Logits only where a target is predicted: the head and its softmax are skipped on image, prompt and
        # padding positions (most of them; with a 49k vocabulary, a large share of a step).
        is_target, logits_at = next_token_targets(batch["labels"])  # (B, T-1), (K,)
        logits = forward(
            batch["input_ids"], batch["images"], prefix_lengths=batch.get("prefix_lengths"),
            position_ids=batch.get("position_ids"), segment_ids=batch.get("segment_ids"), logits_at=logits_at,
        )  # (K, V) for the K targets, row-major
        return summed_next_token_loss(
            logits, batch["labels"], is_target, per, segment_ids=batch.get("segment_ids"), num_samples=len(batch["ids"])
        )

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token cross-entropy over supervised tokens, and their count."""
        total, n_tokens = self.summed_loss(batch)
        return total / n_tokens.clamp(min=1), n_tokens

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        per = self.hparams.loss_weighting
        total, units = self.summed_loss(batch, per=per)
        # The loss is a mean over the units (tokens, or samples) of the whole (global) batch, on any number of
        # devices. DDP and FSDP average gradients over ranks, so a per-rank mean would weight each rank's units by
        # 1 / (its own count): ranks with short answers would count for more. Dividing the rank's sum by the
        # global count and multiplying by the world size makes that average exactly the global-batch gradient.
        # One all-reduce gives the count and the summed loss to log; on one device it is a no-op.
        # float32 counts exactly up to 2**24 per global batch.
        global_total, global_units = self.trainer.strategy.reduce(
            torch.stack([total.detach(), units.to(total.dtype)]), reduce_op="sum"
        )
        global_units = global_units.clamp(min=1)
        loss = total * self.trainer.world_size / global_units
        bs = batch["input_ids"].size(0)
        # The same global-batch mean on every rank, so the logged value needs no further sync.
        self.log("train/loss", global_total / global_units, prog_bar=True, batch_size=bs)
        self.log(f"train/{per}s", global_units, reduce_fx="sum", batch_size=bs)
        # Samples the collator dropped as unreadable (data.on_bad_sample: skip): summed over the epoch and the ranks
        # (one all-reduce at the epoch's end), so the run's metrics count every one, not only those of logged steps.
        self.log(
            "train/skipped_samples", float(batch.get("skipped", 0)), reduce_fx="sum", on_step=False, on_epoch=True,
            sync_dist=True, batch_size=bs,
        )
        # Checked for NaN/inf with the gradients, before the optimizer step (on_before_optimizer_step).
        self._step_losses.append(global_total.detach() / global_units)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Stop at the first non-finite loss or gradient, before the optimizer step writes it into the weights:
        # a diverged run otherwise trains on for hours and saves NaN checkpoints that load and export as a model.
        # One host sync per step for the loss(es) of the accumulated micro-batches and the gradient norm together.
        # Under fp16's GradScaler an inf gradient is routine (the scaler skips that step and lowers its scale), so
        # only the loss is checked there.
        losses, self._step_losses = self._step_losses, []
        checks = list(losses)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads and not scaled else None
        if grad_norm is not None:
            checks.append(grad_norm)
        if not checks:
            return
        bad = (~torch.isfinite(torch.stack(checks))).any().float()
        # Every rank must stop together (or the others hang in the next all-reduce). The loss is the global batch's
        # on every rank already, but a gradient shard (FSDP) is not: agree on the sum of the ranks' verdicts.
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item():
            raise FloatingPointError(self._nonfinite_message(losses, grad_norm))

    def _nonfinite_message(self, losses: list[torch.Tensor], grad_norm: torch.Tensor | None) -> str:
        loss_values = [float(x) for x in losses]
        bad_loss = not all(math.isfinite(x) for x in loss_values)
        values = f"train/loss={', '.join(f'{x:.4g}' for x in loss_values)}"
        if grad_norm is not None:
            values += f", gradient norm={float(grad_norm):.4g}"
        # The rate each component trained at (its groups "decoder" and "decoder_no_decay" share one).
        rates: dict[str, float] = {}
        for group in self.trainer.optimizers[0].param_groups:
            rates.setdefault(group.get("name", "params").removesuffix("_no_decay"), group["lr"])
        lrs = ", ".join(f"{name} {lr:.3g}" for name, lr in rates.items())
        return (
            f"training stopped at step {self.trainer.global_step}: the {'loss' if bad_loss else 'gradient'} is not "
            f"finite ({values}; learning rate: {lrs}). This step's update was not applied and no checkpoint of it is "
            f"written. Lower model.lr (or the component's *_lr), set trainer.gradient_clip_val, or check this "
            f"batch's data"
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, n_tokens = self.loss(batch)
        # Weight by supervised tokens: a mean of per-batch means would over-weight short answers.
        self.val_loss.update(loss, n_tokens)

    # Testing scores a split exactly as validation does, under its own names.
    test_step = validation_step

    def _log_eval_loss(self, split: str, prog_bar: bool = False) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log(f"{split}/loss", loss, prog_bar=prog_bar)
        self.log(f"{split}/ppl", loss.exp(), prog_bar=prog_bar)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_loss("val", prog_bar=True)
        if self.trainer.sanity_checking:
            return
        self._validations += 1
        every = self.hparams.eval_every_n_validations
        if every and self._validations % every == 0:
            self._log_generation_metrics()

    def _log_generation_metrics(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "dataset"):
            return
        # Every rank scores the same fixed subset (greedy decoding is deterministic), so the logged values
        # agree across ranks without a gather.
        metrics, _ = evaluate(
            self.model, self.tokenizer, datamodule.dataset("val"), batch_size=datamodule.batch_size,
            max_new_tokens=self.hparams.max_new_tokens, max_length=datamodule.max_length,
            limit=self.hparams.eval_samples,
        )
        shown = {"caption/exact_match": "val/cap_em", "vqa/vqa_acc": "val/vqa_acc"}
        for key, value in metrics.items():
            if key.endswith("samples"):
                continue
            self.log(shown.get(key, f"val/{key}"), value, prog_bar=key in shown)

    def on_test_epoch_end(self) -> None:
        self._log_eval_loss("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return predict_batch(self.model, self.tokenizer, batch, self.hparams.max_new_tokens)

    def _param_groups(self) -> list[dict]:
        groups = []
        for name in COMPONENTS:
            if self.frozen[name]:
                continue
            component = getattr(self.model, name)
            lr = getattr(self.hparams, f"{name}_lr") or self.hparams.lr
            embedding_params = {
                id(m.weight) for m in component.modules() if isinstance(m, torch.nn.Embedding)
            }
            decay, no_decay = [], []
            for pname, p in component.named_parameters():
                if not p.requires_grad:
                    continue
                is_embedding = id(p) in embedding_params or pname.split(".")[-1] in _EMBEDDING_NAMES
                (no_decay if p.ndim < 2 or is_embedding else decay).append(p)
            groups.append({"name": f"{name}", "params": decay, "lr": lr, "weight_decay": self.hparams.weight_decay})
            groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("every component is frozen: nothing to train (check freeze_vision/projector/decoder)")
        return groups

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self._param_groups(), betas=tuple(self.hparams.betas), fused=None)
        total = self.hparams.lr_decay_steps or max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total // 2)
        floor = self.hparams.min_lr_ratio

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: bool = True, **kwargs):
        """Lightning's, for a local file only and with ``weights_only=True``: loading a checkpoint never runs code
        from it (Lightning's default unpickles whatever a URL serves)."""
        if weights_only is not True:
            raise ValueError("weights_only must be True: an mmgpt checkpoint is plain data, loaded without pickle code")
        path = checkpoint_path if hasattr(checkpoint_path, "read") else local_path(checkpoint_path, "checkpoint_path")
        return super().load_from_checkpoint(
            path, map_location=map_location, hparams_file=hparams_file, strict=strict, weights_only=True, **kwargs
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint carries the full model config and the tokenizer, so mmgpt.load(ckpt) needs nothing else.
        add_to_lightning_checkpoint(checkpoint, self.model, self.tokenizer, self.hparams.lora)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Every Lightning load passes here before the weights are copied: resuming, validate/test/predict with a
        # ckpt_path, load_from_checkpoint.
        check_finite(checkpoint.get("state_dict", {}), "the checkpoint being loaded")
        if (tokenizer := tokenizer_from_lightning_checkpoint(checkpoint)) is not None:
            self.tokenizer = tokenizer
