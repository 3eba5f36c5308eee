"""MMGPT: image -> vision tower -> projector -> spliced into the token embeddings -> decoder -> logits.

With ``vision.anyres`` (LLaVA-OneVision) a picture is several tiles whose projected tokens ``packer`` packs into one
sequence of a length that depends on the picture's size (``mmgpt.models.anyres``); the splice is the same, over
every picture's tokens in a row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn

from mmgpt.config import MMGPTConfig
from mmgpt.models.anyres import AnyresImage, AnyresImageProcessor, AnyresLayout, AnyresPacker
from mmgpt.models.attention import build_attention_mask, build_packed_attention_mask
from mmgpt.models.decoder import Decoder
from mmgpt.models.hf_decoder import HFDecoder
from mmgpt.models.projector import Projector
from mmgpt.models.vision import VisionTower


class MMGPT(nn.Module):
    """A multimodal GPT.

    A prompt holds ``image_seq_len`` ``<image>`` placeholder tokens per image; their embeddings are overwritten
    by the projected patch tokens of that image (images in order of appearance, across the batch). A sequence
    with no placeholder is plain text, and a batch may mix both. With ``decoder.attention="prefix"`` the image
    and prompt (the first ``prefix_lengths`` tokens of a row) attend to each other both ways.

    With ``vision.anyres`` a picture is an ``AnyresImage`` (``model.processor(picture)``) and takes
    ``num_image_tokens(image)`` placeholders: images are a list of them, ``encode_images`` returns every picture's
    packed tokens in a row, ``(total_tokens, n_embd)``, and ``image_seq_len`` has no single value (it raises; that
    also keeps a ``PrefixCache``, which cuts a prompt into runs of ``image_seq_len``, away from such a model).
    """

    def __init__(self, config: MMGPTConfig) -> None:
        super().__init__()
        if config.image_token_id < 0:
            raise ValueError("config.image_token_id is not set: take it from the tokenizer (the id of '<image>')")
        if config.decoder.hf_path and config.decoder.hf_config is None:
            # The decoder's size comes from the pretrained LM's own config, which is on disk: the factory reads it.
            raise ValueError(
                "decoder.hf_path is set but decoder.hf_config is not: build the model with "
                "mmgpt.create_model(config), which reads the LM's config from that path"
            )
        self.config = config
        self.vision = VisionTower(config.vision)
        self.decoder = HFDecoder(config.decoder) if config.decoder.backend == "hf" else Decoder(config.decoder)
        self.projector = Projector(
            config.projector, self.vision.embed_dim, self.vision.grid_size, config.decoder.n_embd
        )
        # LLaVA-OneVision's pictures of any size: their processor and the packer of their tiles' tokens.
        self.anyres_processor: AnyresImageProcessor | None = None
        self.packer: AnyresPacker | None = None
        if config.vision.anyres is not None:
            self.anyres_processor, self.packer = self._build_anyres(config)

    def _build_anyres(self, config: MMGPTConfig) -> tuple[AnyresImageProcessor, AnyresPacker]:
        grid = self.vision.grid_size
        if grid[0] != grid[1] or config.projector.pixel_shuffle != 1:
            # The packer lays each tile's tokens out as a g x g square of the picture.
            raise ValueError(
                f"vision.anyres needs a square token grid per tile without pixel shuffle; got {grid[0]}x{grid[1]} "
                f"patches and projector.pixel_shuffle={config.projector.pixel_shuffle}"
            )
        fields = dataclasses.asdict(config.vision.anyres)
        max_tiles = fields.pop("max_tiles")
        try:
            processor = AnyresImageProcessor(tile_size=config.vision.img_size, **fields)
            layout = AnyresLayout(config.vision.img_size, grid[0], processor.grid_pinpoints, max_tiles)
        except ValueError as e:
            raise ValueError(f"vision.anyres: {e}") from e
        processor.layout = layout  # so that the processor alone counts a picture's placeholders (a collator's)
        return processor, AnyresPacker(config.decoder.n_embd, layout)

    @property
    def image_seq_len(self) -> int:
        """Number of ``<image>`` placeholders one image takes in a prompt."""
        if self.packer is not None:
            raise ValueError(
                "an anyres model's pictures take a number of <image> tokens that depends on their size: use "
                "model.num_image_tokens(image)"
            )
        return self.projector.num_tokens

    @property
    def processor(self):
        """Pictures -> what ``encode_images`` takes (an ``AnyresImage`` per picture with ``vision.anyres``)."""
        return self.anyres_processor if self.anyres_processor is not None else self.vision.processor

    def num_image_tokens(self, image: AnyresImage | None = None) -> int:
        """The ``<image>`` placeholders an image takes in a prompt: ``image_seq_len``, or with ``vision.anyres``
        the length of ``image``'s packed tokens (which depends on its size and on whether it was split)."""
        if self.packer is None:
            return self.image_seq_len
        if not isinstance(image, AnyresImage):
            raise TypeError(
                f"an anyres model counts a picture's tokens from model.processor(picture), an AnyresImage; got "
                f"{type(image).__name__}"
            )
        return self.packer.layout.num_tokens(*image.size, split=image.split)

    def encode_images(self, images: torch.Tensor | Sequence[AnyresImage]) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` -> embeddings ``(N, image_seq_len, n_embd)`` ready to splice.

        With ``vision.anyres``: a list of ``AnyresImage`` -> every picture's packed tokens one after the other,
        ``(total_tokens, n_embd)``; every tile of every picture goes through the tower and the projector in one batch.
        """
        if self.packer is None:
            return self.projector(self.vision(images))
        if isinstance(images, torch.Tensor) or any(not isinstance(im, AnyresImage) for im in images):
            raise TypeError(
                "an anyres model takes its pictures as a list of AnyresImage (model.processor(picture)), not as a "
                "pixel tensor: a picture's tiles only make sense with its size"
            )
        if not images:
            return self.packer.image_newline.new_empty(0, self.config.decoder.n_embd)
        pixels = torch.cat([image.pixels for image in images])  # (sum K, 3, S, S)
        tiles = self.projector(self.vision(pixels))  # (sum K, g*g, n_embd)
        counts = [image.pixels.size(0) for image in images]
        return torch.cat([self.packer(t, image.size) for image, t in zip(images, tiles.split(counts), strict=True)])

    def embed(
        self, input_ids: torch.Tensor, images: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by projected image tokens.

        Args:
            input_ids: ``(B, T)``.
            images: ``(N, 3, H, W)``: one per placeholder run, in the order they appear in the batch (with
                ``vision.anyres``: a list of ``AnyresImage``, in the order of their placeholders).
            image_embeds: ``(N, image_seq_len, n_embd)`` from ``encode_images``, instead of ``images``
                (``(total_tokens, n_embd)`` with ``vision.anyres``).

        Returns:
            ``(B, T, n_embd)``.
        """
        x = self.decoder.wte(input_ids)  # (B, T, C)
        is_image = input_ids == self.config.image_token_id  # (B, T)
        if image_embeds is None and images is not None:
            image_embeds = self.encode_images(images)
        if self.packer is not None and image_embeds is not None and image_embeds.dim() != 2:
            raise ValueError(
                f"image_embeds of an anyres model are every picture's tokens in a row, (total_tokens, n_embd); got "
                f"{tuple(image_embeds.shape)}"
            )
        n_images = 0 if image_embeds is None else image_embeds.size(0)  # anyres: the tokens of all pictures
        # Under torch.compile the count would break the graph (a host sync): compiled training checks its batch
        # eagerly, with this same method, before it calls the compiled forward.
        if not torch.compiler.is_compiling():
            if self.packer is not None:
                self.check_anyres_tokens(input_ids, n_images)
            else:
                self.check_image_tokens(input_ids, n_images)
        if n_images:
            # Placeholders are filled in row-major order: image i lands in the i-th run (anyres: the k-th token
            # of the pictures in a row lands in the k-th placeholder). A gather by running count rather than a
            # boolean-mask assignment, whose data-dependent shape torch.compile cannot fuse.
            B, T, C = x.shape
            order = is_image.flatten().cumsum(0).sub(1).clamp(min=0)  # (B*T,) placeholder index of each slot
            spliced = image_embeds.reshape(-1, C).to(x.dtype)[order].view(B, T, C)
            x = torch.where(is_image[..., None], spliced, x)
        return x

    def check_inputs(
        self, input_ids: torch.Tensor, images: torch.Tensor | Sequence[AnyresImage] | None,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """The checks ``forward`` makes eagerly, for callers about to run it compiled (where they are skipped)."""
        if self.packer is not None:
            self.check_anyres_tokens(input_ids, sum(self.num_image_tokens(im) for im in images or ()))
        else:
            self.check_image_tokens(input_ids, 0 if images is None else images.size(0))
        if hasattr(self.decoder, "check_positions"):  # the native decoder's RoPE table ends at block_size
            T = input_ids.size(1)
            self.decoder.check_positions(position_ids if position_ids is not None else torch.arange(T))

    def check_image_tokens(self, input_ids: torch.Tensor, n_images: int) -> None:
        """Raise if ``input_ids`` does not hold exactly ``image_seq_len`` placeholders for each of ``n_images``."""
        found = int((input_ids == self.config.image_token_id).sum())
        expected = n_images * self.image_seq_len
        if found != expected:
            raise ValueError(
                f"the input has {found} <image> tokens but {n_images} image(s) x {self.image_seq_len} tokens each "
                f"= {expected} were expected; render prompts with image_seq_len={self.image_seq_len} per image"
            )

    def check_anyres_tokens(self, input_ids: torch.Tensor, n_tokens: int) -> None:
        """``vision.anyres``: raise if ``input_ids`` does not hold exactly ``n_tokens`` placeholders (the pictures'
        packed tokens in all)."""
        found = int((input_ids == self.config.image_token_id).sum())
        if found != n_tokens:
            raise ValueError(
                f"the input has {found} <image> tokens but the pictures make {n_tokens}; write each picture's "
                f"model.num_image_tokens(image) placeholders (anyres.repeat_image_markers)"
            )

    def forward(
        self, input_ids: torch.Tensor, images: torch.Tensor | None = None, *,
        image_embeds: torch.Tensor | None = None,
        # Training's masks: the prefix of a prefix-LM, packed rows.
        prefix_lengths: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
        # Passed on to the decoder (BaseDecoder.forward).
        input_pos: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None, logits_to_keep: int = 0, logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)``; see ``embed`` and ``BaseDecoder.forward`` for the arguments.

        Args:
            prefix_lengths: ``(B,)`` tokens of image + prompt at the start of each (right-padded) row, as the
                ``Collator`` gives them in ``batch["prefix_lengths"]``. Required with
                ``decoder.attention="prefix"`` unless ``attn_mask`` is given; ignored for causal attention.
                With ``segment_ids``, ``(N,)`` per sample, indexed by segment id.
            segment_ids: packed rows (``Collator(pack=True)``): ``(B, T)`` the sample each slot holds, -1 at
                padding; attention stays within a sample. Give the samples' ``position_ids`` with it.
        """
        x = self.embed(input_ids, images, image_embeds)
        if segment_ids is not None:
            if attn_mask is not None or input_pos is not None or position_ids is None:
                raise ValueError(
                    "segment_ids (packed rows) go with position_ids restarting per sample, and without attn_mask "
                    "or input_pos: packing is for training and scoring, not for cached generation"
                )
            prefix = self.config.decoder.attention == "prefix"
            if prefix and prefix_lengths is None:
                raise ValueError("decoder.attention='prefix' needs prefix_lengths (per sample) with packed rows")
            attn_mask = build_packed_attention_mask(segment_ids, position_ids, prefix_lengths if prefix else None)
        if attn_mask is None and self.config.decoder.attention == "prefix":
            if prefix_lengths is None or input_pos is not None:
                raise ValueError(
                    "decoder.attention='prefix' needs prefix_lengths (the image + prompt length of each row, "
                    "batch['prefix_lengths'] from the Collator), or an explicit attn_mask (always with a KV cache)"
                )
            B, T = input_ids.shape
            # Right padding needs no hiding: it comes after each row's answer, which stays causal.
            all_valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
            attn_mask = build_attention_mask(all_valid, torch.arange(T, device=input_ids.device), prefix_lengths)
        return self.decoder(
            inputs_embeds=x, input_pos=input_pos, position_ids=position_ids, attn_mask=attn_mask,
            logits_to_keep=logits_to_keep, logits_at=logits_at,
        )
