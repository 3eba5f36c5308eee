"""MMGPT: image -> vision tower -> projector -> spliced into the token embeddings -> decoder -> logits."""

from __future__ import annotations

import torch
import torch.nn as nn

from mmgpt.config import MMGPTConfig
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

    @property
    def image_seq_len(self) -> int:
        """Number of ``<image>`` placeholders one image takes in a prompt."""
        return self.projector.num_tokens

    @property
    def processor(self):
        return self.vision.processor

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` -> embeddings ``(N, image_seq_len, n_embd)`` ready to splice."""
        return self.projector(self.vision(images))

    def embed(
        self, input_ids: torch.Tensor, images: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by projected image tokens.

        Args:
            input_ids: ``(B, T)``.
            images: ``(N, 3, H, W)``: one per placeholder run, in the order they appear in the batch.
            image_embeds: ``(N, image_seq_len, n_embd)`` from ``encode_images``, instead of ``images``.

        Returns:
            ``(B, T, n_embd)``.
        """
        x = self.decoder.wte(input_ids)  # (B, T, C)
        is_image = input_ids == self.config.image_token_id  # (B, T)
        if image_embeds is None and images is not None:
            image_embeds = self.encode_images(images)
        n_images = 0 if image_embeds is None else image_embeds.size(0)
        # Under torch.compile the count would break the graph (a host sync): compiled training checks its batch
        # eagerly, with this same method, before it calls the compiled forward.
        if not torch.compiler.is_compiling():
            self.check_image_tokens(input_ids, n_images)
        if n_images:
            # Placeholders are filled in row-major order: image i lands in the i-th run. A gather by running count
            # rather than a boolean-mask assignment, whose data-dependent shape torch.compile cannot fuse.
            B, T, C = x.shape
            order = is_image.flatten().cumsum(0).sub(1).clamp(min=0)  # (B*T,) placeholder index of each slot
            spliced = image_embeds.reshape(-1, C).to(x.dtype)[order].view(B, T, C)
            x = torch.where(is_image[..., None], spliced, x)
        return x

    def check_inputs(
        self, input_ids: torch.Tensor, images: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> None:
        """The checks ``forward`` makes eagerly, for callers about to run it compiled (where they are skipped)."""
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
