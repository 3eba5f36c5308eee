"""The user-facing model object: load from a checkpoint or an exported directory, generate or stream text, save.

File formats are ``mmgpt.checkpoint``'s; this module turns images and prompts into text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from mmgpt.checkpoint import CONFIG_FILE, load_checkpoint, load_lora_adapter, save_exported
from mmgpt.data.collate import pad_rows
from mmgpt.generation.config import GenerationConfig
from mmgpt.generation.engine import generate as generate_ids
from mmgpt.generation.engine import resolve_generation_config, stream_tokens
from mmgpt.generation.prefix_cache import PrefixCache
from mmgpt.generation.stopping import cut_at_stop_string
from mmgpt.messages import image_places, parse_messages
from mmgpt.models.anyres import AnyresImageProcessor
from mmgpt.models.image_processor import ImageInput
from mmgpt.models.image_tiling import TilingImageProcessor, image_prompt
from mmgpt.models.mmgpt import MMGPT
from mmgpt.prompts import IMAGE, conversation, encode_conversation
from mmgpt.tokenizer import ASSETS

DEFAULT_MODEL = ASSETS / "default_model"


@dataclass(frozen=True)
class ImageEmbedding:
    """An image run through the vision tower and projector once (``Pipeline.encode_image``).

    Pass it wherever an image goes: several questions about one image then encode it once.
    """

    # (image_seq_len, n_embd), ready to splice into the prompt; (tiles, image_seq_len, n_embd) when tiled; a
    # packed picture's (tokens, n_embd)
    embeds: torch.Tensor
    # (rows, cols) of a tiled (Idefics3/SmolVLM) or packed (LLaVA-OneVision) picture, (0, 0) when it was not split;
    # None otherwise
    grid: tuple[int, int] | None = None
    # LLaVA-OneVision (vision.anyres): embeds are the picture's packed tokens, as many as its size makes
    packed: bool = False

    def __post_init__(self) -> None:
        ndim = 3 if self.grid is not None and not self.packed else 2
        if not isinstance(self.embeds, torch.Tensor) or self.embeds.ndim != ndim:
            raise TypeError(
                "ImageEmbedding.embeds must be an (image_seq_len, n_embd) tensor (tiles first for a tiled picture, "
                "(tokens, n_embd) for a packed one) from Pipeline.encode_image, got "
                f"{type(self.embeds).__name__} of shape {tuple(getattr(self.embeds, 'shape', ()))}"
            )
        if self.packed and self.grid is None:
            raise TypeError("a packed ImageEmbedding needs its grid: (rows, cols), (0, 0) for a picture taken whole")

    @property
    def tiles(self) -> torch.Tensor:
        """What the model splices for this picture: ``(images, image_seq_len, n_embd)``, or a packed picture's
        ``(tokens, n_embd)``."""
        return self.embeds if self.grid is not None else self.embeds[None]

    @property
    def split(self) -> bool:
        """A packed picture that was cut into tiles: it may only be a prompt's one picture."""
        return self.packed and self.grid != (0, 0)


# What a prompt's image slot takes: nothing, an image, an encoded image, or a list of those (several images).
ImageSlot = ImageInput | ImageEmbedding | None | Sequence[ImageInput | ImageEmbedding]


class Pipeline:
    """A model with its tokenizer and image processor: ``generate`` or ``stream`` text from images and prompts.

    Threads may share a pipeline. The KV cache lives in the model, so its generations take turns (see
    ``mmgpt.generation.decode_state``): a ``generate`` call waits for the one decoding, and every call returns
    exactly what it returns alone (sampling too, with ``seed=`` or a generator per thread). A ``stream`` holds the
    model from its first piece until it is exhausted, closed or garbage-collected; starting another generation on
    the model in the thread holding an unfinished stream raises ``RuntimeError`` (waiting there would never end).
    Tokenizing and ``encode_image`` touch no cache and run in parallel. For parallel decoding, give each thread a
    model of its own (``copy.deepcopy(pipeline)``).

    ``chat`` and ``chat_stream`` keep the KV cache of their recent conversations in ``prefix_cache`` (a
    ``mmgpt.generation.PrefixCache`` of 4 entries; ``PrefixCache(max_entries=n)`` for another bound, ``None`` to
    switch it off), so a conversation's next turn prefills only its new tokens (see ``chat``). Entries made with
    other weights are never used (replaced or changed tensors are detected); after a change that keeps every tensor
    (a switch such as peft's ``disable_adapter_layers``), call ``prefix_cache.clear()``.

    Args:
        model: an ``MMGPT``.
        tokenizer: the tokenizer it was trained with.
    """

    def __init__(self, model: MMGPT, tokenizer: PreTrainedTokenizerFast) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = model.processor
        # Idefics3/SmolVLM: a picture becomes several tiles (mmgpt.models.image_tiling), and its <image> marker the
        # text around their placeholders.
        self.tiled = isinstance(self.processor, TilingImageProcessor)
        # LLaVA-OneVision (mmgpt.models.anyres): a picture's placeholder count depends on its size, and on whether it
        # is its prompt's one picture (split into tiles) or one of several (taken whole), as in HF's processor.
        self.anyres = isinstance(self.processor, AnyresImageProcessor)
        # The defaults of every generate/stream call, as HF's model.generation_config; a call's keywords and
        # generation_config override them.
        self.generation_config = GenerationConfig(
            max_new_tokens=48, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        # Four conversations on a shared pipeline (a server's users, taking turns) keep their caches; each entry
        # is at most one row of the KV cache, block_size tokens.
        self.prefix_cache: PrefixCache | None = PrefixCache(max_entries=4)

    @property
    def device(self) -> torch.device:
        return self.model.decoder.wte.weight.device

    def to(self, device: str | torch.device) -> Pipeline:
        self.model.to(device)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Pipeline:
        """Load an exported directory or a Lightning ``.ckpt`` file (see ``mmgpt.load``)."""
        return cls(*load_checkpoint(path, map_location))

    def load_adapter(self, path: str | Path, merge: bool = True) -> Pipeline:
        """Put a LoRA adapter (peft's format: adapter_config.json + adapter_model.safetensors) on this model.

        Args:
            path: a local adapter directory, as ``mmgpt export --adapter-only`` or ``PeftModel.save_pretrained``
                write it, for the model this pipeline holds (the one its training run started from).
            merge: fold it into the weights (plain layers, decoding as fast as the base); False keeps peft's
                LoRA layers.

        Returns:
            ``self``.
        """
        load_lora_adapter(self.model, path, merge=merge)
        self.model.eval()
        if self.prefix_cache is not None:
            # peft merges through .data, which no tensor version records: cached turns would use the old weights.
            self.prefix_cache.clear()
        return self

    def save_pretrained(self, path: str | Path) -> None:
        """Write config, safetensors weights and tokenizer to directory ``path``."""
        save_exported(self.model, self.tokenizer, path)

    def encode(self, images: Sequence[ImageSlot], prompts: Sequence[str | None]):
        """Tokenize prompts (left-padded) and process images; returns ``(input_ids, attention_mask, images)``.

        Each entry of ``images`` is ``None``, one image, or a list of images for that prompt. ``images`` comes back
        as ``(N, 3, H, W)`` pixels (a tiled picture gives its tiles and global view), or, for an anyres model, a
        list of ``AnyresImage``.
        """
        conversations, per_prompt = self._conversations(images, prompts)
        raw = [im for ims in per_prompt for im in ims]
        if any(isinstance(im, ImageEmbedding) for im in raw):
            raise TypeError("encode() returns pixels; pass ImageEmbedding handles to generate() or stream()")
        pixels, layouts = self._pixels(raw, splits=_splits(per_prompt))
        return *self._tokenize_messages(conversations, layouts), pixels

    @torch.inference_mode()
    def encode_image(self, image: ImageInput, split: bool = True) -> ImageEmbedding:
        """Run one image through the vision tower and projector, for reuse across prompts.

        Args:
            image: a PIL image, a path or a ``(3, H, W)`` tensor.
            split: anyres models (LLaVA-OneVision) only: the picture will be its prompt's one image, cut into
                tiles (the default); False for one of several images in a prompt, which the model takes whole.
                Other models ignore it.

        Returns:
            An ``ImageEmbedding`` to pass to ``generate``/``stream``/``chat`` in place of the image.
        """
        embeds, layouts = self._encode_images([image], splits=[split])
        if self.anyres:
            rows, cols, _ = layouts[0]
            return ImageEmbedding(embeds, (rows, cols), packed=True)
        return ImageEmbedding(embeds if self.tiled else embeds[0], layouts[0] if self.tiled else None)

    def _conversations(self, images: Sequence[ImageSlot], prompts: Sequence[str | None]):
        """``(conversations, per_prompt_images)``: each prompt's template messages, checked, and its images."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one (or None) per prompt")
        # conversation() checks each prompt: a str or None, valid Unicode, and no "<image>" marker of its own.
        per_prompt = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        conversations = [conversation(p, num_images=len(ims)) for ims, p in zip(per_prompt, prompts, strict=True)]
        return conversations, per_prompt

    def _tokenize_messages(
        self, conversations: Sequence[list[dict[str, str]]], layouts: Sequence[tuple[int, ...]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Template messages (``<image>`` markers in place) -> left-padded ``(input_ids, attention_mask)``, ready
        for the assistant's turn. ``layouts``: each picture's layout (``_pixels``), in marker order across the
        conversations, when the processor tiles or packs."""
        ids, mask = pad_rows(self._token_rows(conversations, layouts), self.tokenizer.pad_token_id, side="left")
        return ids.to(self.device), mask.to(self.device)

    def _token_rows(
        self, conversations: Sequence[list[dict[str, str]]], layouts: Sequence[tuple[int, ...]] | None = None
    ) -> list[list[int]]:
        """``_tokenize_messages``' rows before padding: each conversation's token ids."""
        texts = None if layouts is None else iter(self._image_texts(layouts))
        # An anyres model has no one placeholder count per image: every marker's text is given.
        seq_len = 0 if self.anyres else self.model.image_seq_len
        rows = []
        for messages in conversations:
            n = sum(m["content"].count(IMAGE) for m in messages if m["role"] != "assistant")
            rows.append(encode_conversation(
                self.tokenizer, messages, seq_len,
                add_generation_prompt=True, image_texts=None if texts is None else [next(texts) for _ in range(n)],
                locate_turns=False,  # a prompt to answer: its ids are all that is needed
            )[0])
        return rows

    def _image_texts(self, layouts: Sequence[tuple[int, ...]]) -> list[str]:
        """What each picture's ``<image>`` marker becomes, as the HF processor writes it: a tiled picture's tiles
        with their row/column markers (``image_tiling.image_prompt``), a packed picture's count of placeholders."""
        if self.anyres:
            return [IMAGE * tokens for _, _, tokens in layouts]
        return [image_prompt(rows, cols, self.model.image_seq_len) for rows, cols in layouts]

    def _pixels(
        self, images: Sequence[ImageInput], places: Sequence[str] | None = None, splits: Sequence[bool] | None = None
    ):
        """``(pixels, layouts)``: processed images and each picture's layout, for ``_image_texts`` (None for a
        processor that neither tiles nor packs).

        Pixels are ``(N, 3, H, W)`` (a tiled picture gives its tiles and global view, layout ``(rows, cols)``), or
        for an anyres model a list of ``AnyresImage`` (layout ``(rows, cols, tokens)``; ``splits`` says which
        pictures are their prompt's only one, cut into tiles). An image that cannot be read is an error naming its
        place (a chat message's part) where ``places`` gives them."""
        if not images:
            return None, ([] if self.tiled or self.anyres else None)
        splits = [True] * len(images) if splits is None else splits
        pixels = []
        for k, im in enumerate(images):
            try:
                pixels.append(self.processor(im, split=splits[k]) if self.anyres else self.processor(im))
            except (TypeError, ValueError) as e:
                if places is None:
                    raise
                raise _located(e, places[k]) from e
        if self.anyres:
            pixels = [dataclasses.replace(p, pixels=p.pixels.to(self.device)) for p in pixels]
            return pixels, [(*p.grid, self.model.num_image_tokens(p)) for p in pixels]
        if self.tiled:
            return torch.cat([p.pixels for p in pixels]).to(self.device), [(p.rows, p.cols) for p in pixels]
        return torch.stack(pixels).to(self.device), None

    def _inputs(self, images: Sequence[ImageSlot], prompts: Sequence[str | None]):
        """``(input_ids, attention_mask, image_embeds)``: images are encoded in one batch, handles reused."""
        conversations, per_prompt = self._conversations(images, prompts)
        embeds, layouts = self._embed([im for ims in per_prompt for im in ims], splits=_splits(per_prompt))
        return *self._tokenize_messages(conversations, layouts), embeds

    def encode_chat(self, conversations: Sequence[Sequence[Mapping[str, Any]]]):
        """Conversations (HF/OpenAI-style messages, see ``chat``) -> ``(input_ids, attention_mask, image_embeds)``:
        left-padded ids rendered by the model's chat template up to the assistant's turn, and the embeddings of
        every image, in order (``None`` when there are none).

        Raises:
            TypeError, ValueError: as ``mmgpt.messages.parse_messages``, naming the conversation and message; an
                image that cannot be read (``mmgpt.models.image_processor.BadImageError``), naming its part; an
                ``ImageEmbedding`` that does not fit its place.
        """
        parsed, places = [], []
        for k, messages in enumerate(conversations):
            where = None if len(conversations) == 1 else f"conversation {k}"
            try:
                parsed.append(parse_messages(messages))
            except (TypeError, ValueError) as e:
                if where is None:
                    raise
                raise _located(e, where) from None
            places += [place if where is None else f"{where}: {place}" for place in image_places(messages)]
        splits = _splits([ims for _, ims in parsed])
        embeds, layouts = self._embed([im for _, ims in parsed for im in ims], places, splits)
        return *self._tokenize_messages([msgs for msgs, _ in parsed], layouts), embeds

    def count_chat_tokens(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """The length in tokens, images included, of the prompt ``encode_chat`` gives one conversation, found
        without encoding its images (a tiling or packing processor still processes each picture, to learn its
        layout): what a server checks against the context before queueing it.

        Args:
            messages: one conversation, as ``chat`` takes it.

        Raises:
            TypeError, ValueError: as ``encode_chat``.
        """
        template_messages, images = parse_messages(messages)
        layouts = None
        if self.tiled or self.anyres:
            places, split = image_places(messages), len(images) == 1
            layouts = [
                self._layout_of(im) if isinstance(im, ImageEmbedding)
                else self._pixels([im], [places[k]], [split])[1][0]
                for k, im in enumerate(images)
            ]
        return len(self._token_rows([template_messages], layouts)[0])

    def _layout_of(self, image: ImageEmbedding) -> tuple[int, ...] | None:
        """An encoded picture's layout, as ``_pixels`` gives it for the picture itself."""
        if self.anyres:
            return (*image.grid, image.embeds.size(0))
        return image.grid

    def _check_embedding(self, image: ImageEmbedding, split: bool, place: str | None) -> None:
        """Raise a ValueError (naming ``place``) if ``image`` was not encoded by a model like this one for where it
        is: its shape, its kind (tiled, packed or plain), and for a packed picture whether it was split."""
        where = "" if place is None else f"{place}: "
        n_embd = self.model.config.decoder.n_embd
        if self.anyres:
            if not image.packed or image.embeds.size(1) != n_embd:
                raise ValueError(
                    f"{where}an ImageEmbedding of shape {tuple(image.embeds.shape)} does not fit this model, which "
                    f"splices a picture's packed tokens, (tokens, {n_embd}); encode the image with this pipeline's "
                    f"encode_image"
                )
            if image.split != split:
                raise ValueError(
                    f"{where}this ImageEmbedding was encoded as "
                    + ("its prompt's only image (split into tiles), but it is one of several here"
                       if image.split else "one of several images (taken whole), but it is its prompt's only one here")
                    + f": encode it with encode_image(image, split={split})"
                )
            return
        shape = (self.model.image_seq_len, n_embd)
        if image.packed or tuple(image.tiles.shape[1:]) != shape or (image.grid is not None) != self.tiled:
            raise ValueError(
                f"{where}an ImageEmbedding of shape {tuple(image.embeds.shape)} does not fit this model, which "
                f"splices {shape}" + (" per tile" if self.tiled else "") + "; encode the image with this pipeline's "
                "encode_image"
            )

    def _embed(
        self, flat: Sequence[ImageInput | ImageEmbedding], places: Sequence[str] | None = None,
        splits: Sequence[bool] | None = None,
    ):
        """``(embeds, layouts)``: the embeddings of images and handles in order, raw images encoded in one batch,
        and each picture's layout (``_pixels``; None for a processor that neither tiles nor packs).

        Embeddings are ``(N, image_seq_len, n_embd)`` (a tiled picture gives one per tile), or for an anyres model
        every picture's packed tokens in a row, ``(total_tokens, n_embd)``. ``places`` names each image in errors
        (a chat message's part); ``splits`` says which pictures are their prompt's only one (anyres models)."""
        if not flat:
            return None, ([] if self.tiled or self.anyres else None)
        splits = [True] * len(flat) if splits is None else splits
        for k, im in enumerate(flat):
            if isinstance(im, ImageEmbedding):
                self._check_embedding(im, splits[k], None if places is None else places[k])
        raw = [k for k, im in enumerate(flat) if not isinstance(im, ImageEmbedding)]
        raw_places = None if places is None else [places[k] for k in raw]
        embeds, layouts = self._encode_images([flat[k] for k in raw], raw_places, [splits[k] for k in raw])
        # Split the batch back into pictures (a tiled one is rows * cols + 1 images, a packed one its tokens), then
        # in flat's order.
        if self.anyres:
            sizes = [tokens for _, _, tokens in layouts]
        else:
            sizes = [r * c + 1 if r else 1 for r, c in layouts] if self.tiled else [1] * len(raw)
        encoded = iter(zip(embeds.split(sizes), layouts if layouts is not None else [None] * len(raw), strict=True))
        pictures = [(im.tiles.to(self.device), self._layout_of(im)) if isinstance(im, ImageEmbedding)
                    else next(encoded) for im in flat]
        return torch.cat([e for e, _ in pictures]), ([g for _, g in pictures] if layouts is not None else None)

    @torch.inference_mode()
    def _encode_images(
        self, images: Sequence[ImageInput], places: Sequence[str] | None = None, splits: Sequence[bool] | None = None
    ):
        """Images -> ``(embeds, layouts)``: embeddings in one batch (``_embed``'s; none: an empty tensor) and the
        pictures' layouts (``_pixels``)."""
        if not images:
            n_embd = self.model.config.decoder.n_embd
            shape = (0, n_embd) if self.anyres else (0, self.model.image_seq_len, n_embd)
            return torch.empty(*shape, device=self.device), ([] if self.tiled or self.anyres else None)
        pixels, layouts = self._pixels(images, places, splits)
        # One forward per picture: CPU matmul kernels round differently at different batch sizes, and a picture must
        # encode to the same bits alone or beside others (the prefix cache matches images by value, and an
        # encode_image handle must splice what the image itself would).
        if self.anyres:
            return torch.cat([self.model.encode_images([p]) for p in pixels]), layouts
        sizes = [r * c + 1 if r else 1 for r, c in layouts] if self.tiled else [1] * len(images)
        return torch.cat([self.model.encode_images(p) for p in pixels.split(sizes)]), layouts

    def _generation_config(
        self, generation_config: GenerationConfig | None, max_new_tokens: int | None, kwargs: dict[str, Any]
    ) -> GenerationConfig:
        """The config a call decodes with: ``generation_config`` (default ``self.generation_config``), then the
        call's keywords; eos and pad come from the tokenizer unless set."""
        # Resolved once alone first: that checks it is a GenerationConfig before its fields are read.
        config = resolve_generation_config(self.generation_config if generation_config is None else generation_config)
        if config.eos_token_id is None:
            config = config.update(eos_token_id=self.tokenizer.eos_token_id)
        if config.pad_token_id is None:
            config = config.update(pad_token_id=self.tokenizer.pad_token_id)
        if max_new_tokens is not None:
            kwargs = {**kwargs, "max_new_tokens": max_new_tokens}
        return resolve_generation_config(config, **kwargs)

    def _generator(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is None:
            return generator
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
        if generator is not None:
            raise ValueError("pass seed or generator, not both")
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _text(self, ids: torch.Tensor, stop_strings: Sequence[str] | None) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return cut_at_stop_string(text, stop_strings)[0].strip()

    def generate(
        self,
        images: ImageSlot | Sequence[ImageSlot] = None,
        prompts: str | None | Sequence[str | None] = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        tokenizer: PreTrainedTokenizerFast | None = None,
        **kwargs: Any,
    ) -> str | list[str] | list[list[str]]:
        """Generate text for one (image, prompt) pair or for lists of them, batched.

        Args:
            images: a PIL image, a path, a ``(3, H, W)`` tensor, an ``ImageEmbedding`` from ``encode_image``,
                ``None`` (text only), or a list of those, one per prompt; a list inside the list gives that
                prompt several images.
            prompts: the user's text, or a list; ``None`` with an image asks for a caption.
            max_new_tokens: the most tokens to generate per answer (default: ``generation_config``'s, 48 for
                ``self.generation_config``).
            seed: seeds sampling for reproducible results (or pass ``generator=torch.Generator()``).
            generation_config: how to decode; default ``self.generation_config`` (greedy, 48 tokens, the
                tokenizer's eos and pad).
            generator: a ``torch.Generator`` to sample with, instead of ``seed``.
            tokenizer: reads the text for ``stop_strings``; default the pipeline's own.
            **kwargs: any ``GenerationConfig`` field, overriding ``generation_config``'s, in HF ``generate``'s
                names: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
                ``num_return_sequences``, ``num_beams``, ``length_penalty``, ``early_stopping``,
                ``eos_token_id``, ``stop_strings`` (cut from the text), ``compile``. Unknown names raise
                ``TypeError``.

        Returns:
            A string for a single input, a list of strings for lists (empty lists: ``[]``); with
            ``num_return_sequences=n > 1`` each of those becomes a list of ``n`` strings.

        Raises:
            TypeError, ValueError: naming the argument: a prompt that is not a string, not valid Unicode or holds
                ``<image>``; as many images as prompts; a ``GenerationConfig`` field of the wrong type or out of
                range; ``seed`` not an int.
            RuntimeError: this thread holds an unfinished ``stream`` on the same model.
        """
        single = not isinstance(prompts, (list, tuple)) and not isinstance(images, (list, tuple))
        if single:
            images, prompts = [images], [prompts]
        elif not isinstance(images, (list, tuple)):
            images = [images] * len(prompts)
        elif not isinstance(prompts, (list, tuple)):
            prompts = [prompts] * len(images)
        config = self._generation_config(generation_config, max_new_tokens, kwargs)
        generator = self._generator(seed, generator)
        if not prompts and not images:
            return []  # an empty batch (after the arguments were checked, so a bad one is still an error)
        texts = self._generate_texts(self._inputs(images, prompts), config, generator, tokenizer)
        return texts[0] if single else texts

    def _generate_texts(self, inputs, config: GenerationConfig, generator, tokenizer, prefix_cache=None) -> list:
        """Decode ``(input_ids, attention_mask, image_embeds)``: a text per prompt (a list of
        ``num_return_sequences`` texts when that is > 1)."""
        input_ids, attention_mask, image_embeds = inputs
        new = generate_ids(
            self.model, input_ids, attention_mask, image_embeds=image_embeds, generation_config=config,
            generator=generator, tokenizer=tokenizer or self.tokenizer, prefix_cache=prefix_cache,
        )
        texts = [self._text(row, config.stop_strings) for row in new]
        n = config.num_return_sequences
        return [texts[i : i + n] for i in range(0, len(texts), n)] if n > 1 else texts

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        max_new_tokens: int | None = None,
        seed: int | None = None,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        tokenizer: PreTrainedTokenizerFast | None = None,
        reuse_cache: bool = True,
        **kwargs: Any,
    ) -> str | list[str] | list[list[str]]:
        """The assistant's next turn in a conversation, or in each of a list of conversations (batched).

        Messages are HF's and OpenAI's: ``{"role": "system" | "user" | "assistant", "content": ...}`` where content
        is a string or a list of parts, ``{"type": "text", "text": str}`` and ``{"type": "image", "image": PIL
        image | path | (3, H, W) tensor | ImageEmbedding}``. Images may sit in any user or system turn, several per
        turn; the model's chat template places them (mmgpt's own puts every image first, where it was trained to
        find them), and each becomes what the model's HF processor makes of it (Idefics3/SmolVLM: its own tiles and
        row/column markers; LLaVA-OneVision: a conversation's only picture is cut into tiles, each of several is
        taken whole).

        A conversation continued turn by turn (send it back with the reply and the next user message) reuses the
        KV cache of the earlier turns, as litgpt's chat does: a call for one conversation keeps the keys and
        values of its prompt and reply in ``self.prefix_cache``, and the next call loads the longest common prefix
        of token ids and prefills only the rest. The answer is the one a full prefill gives (up to float rounding
        in the last bits, as batched against one-by-one). It is matched by token ids, so an edited earlier message
        reuses what comes before the edit; images count by value, so an earlier image must be the same picture.
        mmgpt's own chat template puts every image first, right after bos: an image added in a later turn moves
        all the text after it, and that turn reuses only bos and the earlier images (correct, just slower); HF
        templates that keep images in their turns reuse everything before the new one. No reuse for batches of
        several conversations, beam search, ``use_cache=False``, ``decoder.attention="prefix"`` (a longer prompt
        changes the earlier keys there), an HF cache with sliding-window layers, or an anyres model
        (LLaVA-OneVision, whose pictures are not runs of ``image_seq_len``): those prefill in full.

        Args:
            messages: one conversation (a list of message dicts) or a list of conversations; each ends with a
                user (or system) message. ``[]`` is an empty conversation, an error.
            max_new_tokens, seed, generation_config, generator, tokenizer, **kwargs: as ``generate``.
            reuse_cache: False neither reads nor writes ``self.prefix_cache`` (a full prefill).

        Returns:
            The reply for one conversation, a list of replies for a list (lists of ``num_return_sequences``
            replies when that is > 1).

        Raises:
            TypeError, ValueError: naming the message and part at fault (``messages[1].content[0].text``), as
                ``mmgpt.messages.parse_messages``; an image that cannot be read (naming its part, as
                ``messages[0].content[0]: image file not found: ...``); a ``GenerationConfig`` field out of range.
        """
        single = _is_conversation(messages)
        conversations = [messages] if single else list(messages)
        config = self._generation_config(generation_config, max_new_tokens, kwargs)
        generator = self._generator(seed, generator)
        prefix_cache = self._prefix_cache(reuse_cache)
        texts = self._generate_texts(self.encode_chat(conversations), config, generator, tokenizer, prefix_cache)
        return texts[0] if single else texts

    def _prefix_cache(self, reuse_cache: bool) -> PrefixCache | None:
        if not isinstance(reuse_cache, bool):
            raise TypeError(f"reuse_cache must be True or False, got {reuse_cache!r}")
        if self.prefix_cache is not None and not isinstance(self.prefix_cache, PrefixCache):
            raise TypeError(
                f"Pipeline.prefix_cache must be a mmgpt.generation.PrefixCache or None, got "
                f"{type(self.prefix_cache).__name__}"
            )
        # A PrefixCache matches images as runs of image_seq_len placeholders, which a packed picture is not.
        return self.prefix_cache if reuse_cache and not self.anyres else None

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_new_tokens: int | None = None,
        seed: int | None = None,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        tokenizer: PreTrainedTokenizerFast | None = None,
        reuse_cache: bool = True,
        **kwargs: Any,
    ) -> Iterator[str]:
        """``chat`` for one conversation, piece by piece as ``stream`` writes them (the pieces join to what
        ``chat`` returns). It reuses and keeps the conversation's KV cache as ``chat`` does; a stream closed early
        keeps what it had written."""
        if not _is_conversation(messages):
            raise TypeError("chat_stream() takes one conversation: a list of {'role', 'content'} dicts")
        config = self._stream_config(generation_config, max_new_tokens, kwargs)
        generator = self._generator(seed, generator)
        prefix_cache = self._prefix_cache(reuse_cache)
        yield from self._stream_text(self.encode_chat([messages]), config, generator, tokenizer, prefix_cache)

    def stream(
        self,
        image: ImageSlot = None,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        tokenizer: PreTrainedTokenizerFast | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """Generate the answer to one prompt piece by piece, as it is written.

        The pieces join to exactly what ``generate`` returns: a character whose UTF-8 bytes span several
        tokens comes out whole, and text that may be the start of a stop string is held back until it is known
        not to be one.

        Args:
            image, prompt, max_new_tokens, seed, generation_config, generator, tokenizer, **kwargs: as
                ``generate`` for one input (one sequence and no beam search: only the end of a beam search knows
                its best sequence).

        Yields:
            Text increments.

        The model is held (other threads' generations wait) from the first piece until the stream is exhausted,
        raises or is closed (``close()``; a ``for`` loop left early closes it once the generator is dropped).
        """
        config = self._stream_config(generation_config, max_new_tokens, kwargs)
        generator = self._generator(seed, generator)
        yield from self._stream_text(self._inputs([image], [prompt]), config, generator, tokenizer)

    def _stream_config(self, generation_config, max_new_tokens, kwargs) -> GenerationConfig:
        config = self._generation_config(generation_config, max_new_tokens, kwargs)
        if config.num_beams > 1 or config.num_return_sequences > 1:
            raise ValueError("stream() writes one sequence: num_beams and num_return_sequences must be 1")
        return config

    def _stream_text(self, inputs, config: GenerationConfig, generator, tokenizer, prefix_cache=None) -> Iterator[str]:
        input_ids, attention_mask, image_embeds = inputs
        text = TextStream(self.tokenizer, config.stop_strings)
        steps = stream_tokens(
            self.model, input_ids, attention_mask, image_embeds=image_embeds, generation_config=config,
            generator=generator, tokenizer=tokenizer or self.tokenizer, prefix_cache=prefix_cache,
        )
        # closing(): closing this generator closes the token stream at once, which frees the model's KV cache and
        # lock, rather than whenever the garbage collector reaches it.
        with contextlib.closing(steps):
            for _, tokens in steps:
                piece = text.push(int(tokens[0]))
                if piece:
                    yield piece
        piece = text.end()
        if piece:
            yield piece


def _splits(per_prompt: Sequence[Sequence[Any]]) -> list[bool]:
    """For each image of each prompt, in order: whether it is its prompt's only image. LLaVA-OneVision's processor
    cuts such a picture into tiles and takes each of several whole; other models ignore it."""
    return [len(images) == 1 for images in per_prompt for _ in images]


def _is_conversation(messages: Any) -> bool:
    """One conversation (a list of messages) rather than a list of conversations (a list of lists): anything
    else is one conversation too, for ``parse_messages`` to name what is wrong in it."""
    return not isinstance(messages, (list, tuple)) or not messages or not isinstance(messages[0], (list, tuple))


def _located(error: Exception, place: str) -> Exception:
    """``error`` again with its place in front of its message (``messages[0].content[1]: ...``), or as it is
    where its type cannot be rebuilt from a message."""
    try:
        return type(error)(f"{place}: {error}")
    except Exception:
        return error


class TextStream:
    """Turns tokens into text increments whose concatenation is the final text (``Pipeline._text``).

    Each push decodes the tokens so far and releases what can no longer change: not a trailing U+FFFD (the
    first bytes of a character whose remaining bytes are in later tokens), not a tail that could begin a stop
    string, and not trailing whitespace (the final text is stripped). ``stopped`` says a stop string was reached.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, stop_strings: Sequence[str] | None) -> None:
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings or ())
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _release(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        text, self.stopped = cut_at_stop_string(text, self.stop_strings)
        if not (final or self.stopped):
            text = text.rstrip("\ufffd")
            # Hold back the longest tail that a stop string starts with: it may complete in the next tokens.
            held = max(
                (n for s in self.stop_strings for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])),
                default=0,
            )
            text = text[: len(text) - held]
        text = text.strip()
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def push(self, token: int, final: bool = False) -> str:
        """Append a token; ``final``: it is the last one, so nothing is held back."""
        self.ids.append(token)
        return self._release(final)

    def end(self) -> str:
        return self._release(final=True)


def load(
    path: str | Path | None = None, map_location: str | torch.device = "cpu", adapter: str | Path | None = None
) -> Pipeline:
    """Load a model for generation.

    Args:
        path: an exported directory (``config.yaml`` + ``model.safetensors`` + tokenizer) or a Lightning
            ``.ckpt`` written by ``mmgpt fit``; ``None`` loads the default model shipped in ``assets/``.
        map_location: device for the weights.
        adapter: a LoRA adapter directory (peft's format) to put on the model at ``path``, merged into its
            weights.

    Returns:
        A ``Pipeline`` with ``.generate(images, prompts, generation_config=None, **kwargs)``, ``.stream``,
        ``.encode_image`` and ``.save_pretrained(dir)``.
    """
    if path is None:
        if not (DEFAULT_MODEL / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"no default model in {DEFAULT_MODEL}. Train one with "
                "`mmgpt fit --config configs/shapes.yaml`, then export it with "
                "`mmgpt export --ckpt CKPT --out assets/default_model`, or pass model=PATH"
            )
        path = DEFAULT_MODEL
    pipeline = Pipeline.from_pretrained(path, map_location)
    return pipeline.load_adapter(adapter) if adapter is not None else pipeline


@functools.cache
def _default_pipeline() -> Pipeline:
    # Loaded on the first call that needs it, then shared by every later one.
    return load()


def generate(
    image: ImageInput | None = None, prompt: str | None = None, model: Pipeline | str | Path | None = None,
    **kwargs: Any,
) -> str:
    """One answer for one image (or ``None`` for text only) and prompt.

    Args:
        image: a PIL image, a path, a ``(3, H, W)`` tensor, or ``None``.
        prompt: the question or instruction; ``None`` with an image asks for a caption.
        model: a ``Pipeline``, a path to load, or ``None`` for the default model shipped in ``assets/``.
        **kwargs: as ``Pipeline.generate``: ``max_new_tokens``, ``seed``, ``generation_config`` and any
            ``GenerationConfig`` field.
    """
    if model is None:
        model = _default_pipeline()
    elif not isinstance(model, Pipeline):
        model = load(model)
    return model.generate(image, prompt, **kwargs)
