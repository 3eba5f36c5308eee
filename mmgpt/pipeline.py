"""The user-facing model object: load from a checkpoint or an exported directory, generate text, save.

An exported directory is self-contained and loads without executing code::

    config.yaml           MMGPTConfig
    model.safetensors     weights
    tokenizer.json        the tokenizer (plus tokenizer_config.json)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from transformers import PreTrainedTokenizerFast

from mmgpt.config import MMGPTConfig
from mmgpt.generation import generate as generate_ids
from mmgpt.image_processor import ImageInput
from mmgpt.model import MMGPT
from mmgpt.prompts import render_prompt
from mmgpt.tokenizer import ASSETS, load_tokenizer, tokenizer_from_json

DEFAULT_MODEL = ASSETS / "default_model"
CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.safetensors"
# Key under which a Lightning checkpoint carries the tokenizer, so that a .ckpt alone is enough to load.
CKPT_TOKENIZER_KEY, CKPT_CONFIG_KEY = "mmgpt_tokenizer", "mmgpt_config"


class Pipeline:
    """A model with its tokenizer and image processor: ``generate`` text from images and prompts.

    Args:
        model: an ``MMGPT``.
        tokenizer: the tokenizer it was trained with.
    """

    def __init__(self, model: MMGPT, tokenizer: PreTrainedTokenizerFast) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = model.processor

    @property
    def device(self) -> torch.device:
        return self.model.decoder.wte.weight.device

    def to(self, device: str | torch.device) -> Pipeline:
        self.model.to(device)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Pipeline:
        """Load an exported directory or a Lightning ``.ckpt`` file (see ``mmgpt.load``)."""
        path = Path(path)
        if path.is_dir():
            config_file = path / CONFIG_FILE
            if not config_file.is_file():
                raise FileNotFoundError(f"{path} is not an exported mmgpt model: {CONFIG_FILE} is missing")
            model = MMGPT(MMGPTConfig.from_yaml(config_file))
            weights = path / WEIGHTS_FILE
            if not weights.is_file():
                raise FileNotFoundError(f"{path} is not an exported mmgpt model: {WEIGHTS_FILE} is missing")
            model.to(map_location)
            load_model(model, str(weights), device=str(map_location))
            return cls(model, load_tokenizer(path))
        if path.is_file():
            model, tokenizer = _from_lightning_checkpoint(path, map_location)
            return cls(model.to(map_location), tokenizer)
        raise FileNotFoundError(f"no model at {path}: expected an exported directory or a Lightning .ckpt file")

    def save_pretrained(self, path: str | Path) -> None:
        """Write config, safetensors weights and tokenizer to directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.config.save_yaml(path / CONFIG_FILE)
        save_model(self.model, str(path / WEIGHTS_FILE))  # handles the tied embedding/lm_head weights
        self.tokenizer.save_pretrained(path)

    def encode(self, images: Sequence[ImageInput | None], prompts: Sequence[str | None]):
        """Tokenize prompts (left-padded) and process images; returns ``(input_ids, attention_mask, images)``."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one (or None) per prompt")
        texts = [
            render_prompt(p, num_images=int(im is not None), image_seq_len=self.model.image_seq_len)
            for im, p in zip(images, prompts, strict=True)
        ]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        pixels = [self.processor(im) for im in images if im is not None]
        pixel_values = torch.stack(pixels).to(self.device) if pixels else None
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), pixel_values

    def generate(
        self,
        images: ImageInput | None | Sequence[ImageInput | None] = None,
        prompts: str | None | Sequence[str | None] = None,
        max_new_tokens: int = 48,
        seed: int | None = None,
        **sampling: Any,
    ) -> str | list[str]:
        """Generate text for one (image, prompt) pair or for lists of them, batched.

        Args:
            images: a PIL image, a path, a ``(3, H, W)`` tensor, ``None`` (text only), or a list of those.
            prompts: the user's text, or a list; ``None`` with an image asks for a caption.
            max_new_tokens: the most tokens to generate per answer.
            seed: seeds sampling for reproducible results.
            **sampling: ``do_sample``, ``temperature``, ``top_k``, ``top_p`` (HF ``generate`` names); greedy
                by default.

        Returns:
            A string for a single input, a list of strings for lists.
        """
        single = not isinstance(prompts, (list, tuple)) and not isinstance(images, (list, tuple))
        if single:
            images, prompts = [images], [prompts]
        elif not isinstance(images, (list, tuple)):
            images = [images] * len(prompts)
        elif not isinstance(prompts, (list, tuple)):
            prompts = [prompts] * len(images)
        input_ids, attention_mask, pixel_values = self.encode(images, prompts)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        new = generate_ids(
            self.model, input_ids, attention_mask, pixel_values,
            max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, generator=generator, **sampling,
        )
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return texts[0] if single else texts


def _from_lightning_checkpoint(path: Path, map_location) -> tuple[MMGPT, PreTrainedTokenizerFast]:
    # weights_only=True: a checkpoint is data; loading it must never run code from the file.
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint we can read safely"
        raise ValueError(f"{path}: cannot read as a Lightning checkpoint with weights_only=True ({e})") from e
    if not isinstance(ckpt, dict) or CKPT_CONFIG_KEY not in ckpt or CKPT_TOKENIZER_KEY not in ckpt:
        raise ValueError(f"{path}: not an mmgpt training checkpoint (no model config or tokenizer inside)")
    config = MMGPTConfig.from_dict(ckpt[CKPT_CONFIG_KEY])
    model = MMGPT(config)
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    return model, tokenizer_from_json(ckpt[CKPT_TOKENIZER_KEY])


def load(path: str | Path | None = None, map_location: str | torch.device = "cpu") -> Pipeline:
    """Load a model for generation.

    Args:
        path: an exported directory (``config.yaml`` + ``model.safetensors`` + tokenizer) or a Lightning
            ``.ckpt`` written by ``scripts/train.py``; ``None`` loads the default model shipped in ``assets/``.
        map_location: device for the weights.

    Returns:
        A ``Pipeline`` with ``.generate(images, prompts, **sampling)`` and ``.save_pretrained(dir)``.
    """
    if path is None:
        if not (DEFAULT_MODEL / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"no default model in {DEFAULT_MODEL}. Train one with "
                "`python scripts/train.py fit --config configs/shapes.yaml`, then export it with "
                "`python scripts/export.py --ckpt CKPT --out assets/default_model`, or pass model=PATH"
            )
        path = DEFAULT_MODEL
    return Pipeline.from_pretrained(path, map_location)


_DEFAULT: Pipeline | None = None


def generate(
    image: ImageInput | None = None, prompt: str | None = None, model: Pipeline | str | Path | None = None,
    **sampling: Any,
) -> str:
    """One answer for one image (or ``None`` for text only) and prompt.

    Args:
        image: a PIL image, a path, a ``(3, H, W)`` tensor, or ``None``.
        prompt: the question or instruction; ``None`` with an image asks for a caption.
        model: a ``Pipeline``, a path to load, or ``None`` for the default model shipped in ``assets/``.
        **sampling: see ``Pipeline.generate``.
    """
    global _DEFAULT
    if model is None:
        if _DEFAULT is None:
            _DEFAULT = load()
        model = _DEFAULT
    elif not isinstance(model, Pipeline):
        model = load(model)
    return model.generate(image, prompt, **sampling)
