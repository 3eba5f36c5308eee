"""Typed configuration for the vision tower, the projector, the decoder and the whole model.

Plain dataclasses with no torch import, so a config can be read, printed and validated without loading a model
(litgpt does the same). Derived fields are filled in ``__post_init__``. ``to_dict``/``from_dict`` and
``save_yaml``/``from_yaml`` give a lossless round trip; unknown keys are an error that names them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


def config_from_dict(cls, d: dict[str, Any], where: str = "config"):
    """Build config dataclass ``cls`` from ``d``, naming the offending key when the dict does not fit.

    Reads what earlier versions saved too: a decoder's ``hf_native: true/false`` is ``backend: native`` / the
    default.
    """
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(d).__name__}")
    if cls is DecoderConfig and "hf_native" in d:
        d = dict(d)
        d.setdefault("backend", "native" if d.pop("hf_native") else None)
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; expected some of {sorted(names)}")
    return cls(**d)


@dataclass
class VisionConfig:
    """The image encoder: any timm ViT or CNN, reached only through timm's public API."""

    # Any timm model name; the default is the smallest standard ViT so a fresh install trains on a CPU.
    name: str = "vit_tiny_patch16_224"
    # Input resolution; overriding timm's default lets a ViT-Tiny run at 64 px on a laptop.
    img_size: int = 64
    # ViT patch size override (None keeps the model's own); 8 px patches at 64 px give an 8x8 grid.
    # Must be None for a CNN, whose strides set its grid.
    patch_size: int | None = 8
    # Extra keyword arguments for timm.create_model (depth, embed_dim, num_heads, ...).
    overrides: dict[str, Any] = field(default_factory=dict)
    # Local timm checkpoint file (.safetensors/.pth, loaded strictly; a classifier head is dropped); nothing is
    # ever downloaded.
    checkpoint_path: str | None = None
    # Which level of timm's forward_intermediates to use (an index into model.feature_info; -1 = the last).
    # ViT: a block; -2 (penultimate) as LLaVA, the last block is tuned for the CLS head.
    # CNN: a stage; ResNet/EfficientNet have 5 (strides 2, 4, 8, 16, 32), so -2 is the stride-16 map and -1
    # the deepest, stride-32 one (fewer, wider tokens).
    feature_layer: int = -2
    # Run the backbone's final norm over the features of feature_layer (timm's forward_intermediates(norm=True)).
    # SigLIP towers as Idefics3/SmolVLM use them hand the connector their post-LayerNorm output; LLaVA's CLIP
    # feature layer is an un-normalized block output, and CNN stages have no final norm.
    final_norm: bool = False
    # Split each picture into img_size tiles plus a downscaled global view, as Idefics3/SmolVLM do: the fields of
    # mmgpt.models.image_tiling.TilingImageProcessor but tile_size, which is img_size (longest_edge,
    # do_image_splitting, mean, std, resample, backend, ...). A picture then takes rows * cols + 1 images, each
    # image_seq_len tokens. None: the whole picture is resized to one img_size square.
    tiling: dict[str, Any] | None = None
    # Pictures of any size as LLaVA-OneVision takes them (mmgpt.models.anyres): tiles on a canvas chosen per
    # picture, their tokens unpadded, pooled and packed with a learned newline per row, so a picture takes a number
    # of tokens that depends on its size. None: every image takes image_seq_len tokens. Not with tiling.
    anyres: AnyresConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.anyres, dict):  # from YAML, a checkpoint or the CLI
            self.anyres = config_from_dict(AnyresConfig, self.anyres, "vision.anyres")
        if self.anyres is not None and self.tiling is not None:
            raise ValueError(
                "vision.tiling and vision.anyres are two ways to cut a picture into tiles (Idefics3's and "
                "LLaVA-OneVision's); set one of them"
            )


@dataclass
class AnyresConfig:
    """How ``vision.anyres`` lays pictures out on tiles and packs their tokens (``mmgpt.models.anyres``): the fields
    of ``AnyresImageProcessor`` but ``tile_size`` (which is ``vision.img_size``), and ``max_tiles``.

    Lists rather than tuples, so that the config round-trips through ``yaml.safe_dump``.
    """

    # (height, width) canvases a picture may be laid out on, multiples of vision.img_size; the one that shows most
    # of the picture's pixels and wastes the least is chosen per picture (LLaVA-OneVision's image_grid_pinpoints).
    grid_pinpoints: list[list[int]] = field(default_factory=list)
    # vision_aspect_ratio="anyres_max_N": a packed map of more than N tiles' worth of tokens is shrunk to about
    # that many, which bounds the prompt length of a huge picture.
    max_tiles: int = 9
    # Per-channel normalization of the tiles; transformers' default for a LLaVA-OneVision processor that names
    # none is OpenAI CLIP's (the released models save SigLIP's 0.5).
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    # 8-bit pixels to [0, 1] before normalizing.
    rescale_factor: float = 1 / 255
    # The resize filter (one of image_tiling.RESAMPLE_NAMES' values); the released models use bicubic.
    resample: str = "bicubic"
    # Whose resize to equal bit for bit: "torchvision" or "pil". None: transformers' default where the model is
    # loaded, so a config saved on one machine does not force a backend on another.
    backend: str | None = None

    def __post_init__(self) -> None:
        self.grid_pinpoints = [[int(x) for x in p] for p in self.grid_pinpoints]  # checked by AnyresLayout
        self.mean, self.std = [float(m) for m in self.mean], [float(s) for s in self.std]
        if isinstance(self.max_tiles, bool) or not isinstance(self.max_tiles, int) or self.max_tiles < 1:
            raise ValueError(f"vision.anyres.max_tiles={self.max_tiles!r} must be a positive int")


@dataclass
class ProjectorConfig:
    """Maps patch features into the decoder's embedding space."""

    # Pixel-shuffle factor r: merges r x r neighbouring patches into one token (r^2 fewer image tokens, as
    # SmolVLM); 1 disables it.
    pixel_shuffle: int = 1
    # Linear layers after the pixel shuffle: 2 is LLaVA-1.5's Linear-GELU-Linear MLP, 1 a single Linear (the
    # connector of Idefics3/SmolVLM, whose pixel shuffle already hands it r^2-wide tokens).
    mlp_depth: int = 2
    # Hidden width of the 2-layer GELU MLP (LLaVA-1.5); None uses the decoder width. Not used with mlp_depth=1.
    hidden_dim: int | None = None
    # Biases in those Linear layers (Idefics3/SmolVLM's connector has none).
    bias: bool = True
    # LayerNorm on the patch features before the MLP (as Qwen2-VL's merger). Intermediate ViT features are
    # un-normalized; from-scratch towers drift in scale, and the decoder then learns to ignore them.
    input_norm: bool = True
    # A learned embedding per image-token slot added to the projector's output, as a ViT adds its position
    # embedding. A CNN's feature map carries no absolute position, and the decoder's RoPE only tells it how far
    # back a token is, which changes with every generated word: the slot embedding names each cell outright.
    pos_embed: bool = False
    # ZCA-whiten the MLP's input with statistics of the training images, measured once when training starts
    # (needs a frozen vision tower). A frozen tower's features are badly conditioned (the quickstart's random ViT:
    # largest/median covariance eigenvalue ~700), and gradient descent learns a direction at a speed set by its
    # variance: the strong ones (is a cell empty) come first, the faint ones (which shape) many steps later.
    whiten: bool = False


ATTENTION_MODES = ("causal", "prefix")
BACKENDS = ("native", "hf")


@dataclass
class DecoderConfig:
    """A Llama-style causal decoder, in nanoGPT/litgpt names."""

    # Set from the tokenizer at build time; 0 means "not set yet".
    vocab_size: int = 0
    # Longest sequence (image tokens + text); sizes the RoPE table and the KV cache.
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    # Grouped-query attention: query heads share n_query_groups key/value heads; None = n_head (plain MHA).
    n_query_groups: int | None = None
    n_embd: int = 128
    # SwiGLU hidden width; None derives Llama's choice in __post_init__.
    intermediate_size: int | None = None
    # 10_000 is the RoPE base of Llama 1/2; long-context models raise it.
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    # Sharing input and output embeddings saves vocab_size * n_embd parameters, a large share of a tiny model.
    tie_embeddings: bool = True
    dropout: float = 0.0
    # "causal": every token sees the tokens before it. "prefix": prefix-LM as PaliGemma, bidirectional over the
    # image and prompt and causal over the answer; the prompt is read as a whole before the answer is written.
    # Training and generation build the same mask from it (models/attention.py).
    attention: str = "causal"
    # A pretrained causal LM as the decoder instead of the native one: a local HF directory (Llama, Qwen2,
    # GPT-2, ... anything AutoModelForCausalLM loads) or a .gguf file. Its weights are read when training starts;
    # the size fields above then come from its config. Nothing is downloaded.
    hf_path: str | None = None
    # That LM's config (config.json as a dict), filled in from hf_path: a saved model rebuilds its decoder from
    # this alone, without hf_path.
    hf_config: dict[str, Any] | None = None
    # Which implementation runs the decoder. "native": mmgpt's own (models/decoder.py). "hf": the transformers
    # model of hf_path/hf_config as it is. With hf_path, "native" converts a Llama-family LM (Llama, SmolLM2, ...)
    # into the native decoder: the same outputs, a leaner and faster decode step, the size fields above filled
    # from its config. None: "hf" when hf_path or hf_config is given, else "native".
    backend: str | None = None
    # Added to every RoPE position before the LM sees it (decoder.backend="hf"). PaliGemma counts positions from 1
    # (HF's PaliGemmaModel adds 1) where mmgpt counts from 0: RoPE attention sees only differences of positions, so
    # 0 computes the same function, and 1 gives PaliGemma's exact float roundings.
    position_offset: int = 0

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"decoder.attention={self.attention!r} is not one of {list(ATTENTION_MODES)}")
        if self.backend is None:
            self.backend = "hf" if self.hf_path is not None or self.hf_config is not None else "native"
        if self.backend not in BACKENDS:
            raise ValueError(f"decoder.backend={self.backend!r} is not one of {list(BACKENDS)}")
        if self.backend == "hf" and self.hf_path is None and self.hf_config is None:
            raise ValueError("decoder.backend='hf' runs a transformers LM: give its local directory in decoder.hf_path")
        if self.hf_config is not None and self.backend == "hf":
            # The projector writes into the LM's embedding space; generation stays within its context length.
            text = self.hf_config.get("text_config") or self.hf_config
            self.n_embd = text.get("hidden_size") or text["n_embd"]
            self.block_size = text.get("max_position_embeddings") or text.get("n_positions") or self.block_size
            return
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"decoder.n_embd={self.n_embd} must be divisible by decoder.n_head={self.n_head}")
        if self.n_head % self.n_query_groups:
            raise ValueError(
                f"decoder.n_head={self.n_head} must be divisible by decoder.n_query_groups={self.n_query_groups}"
            )
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"decoder head size {self.n_embd // self.n_head} must be even for RoPE")
        if self.intermediate_size is None:
            # Llama keeps SwiGLU's parameter count equal to a 4x GELU MLP: 2/3 * 4 * n_embd, rounded to 16.
            self.intermediate_size = 16 * -(-int(8 * self.n_embd / 3) // 16)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class MMGPTConfig:
    """The whole model: vision tower -> projector -> decoder, plus the token id that marks image slots."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Id of the <image> placeholder in the tokenizer; set from the tokenizer when the model is built.
    image_token_id: int = -1

    def __post_init__(self) -> None:
        # Accept plain dicts (from YAML or the CLI) for the sub-configs.
        if isinstance(self.vision, dict):
            self.vision = config_from_dict(VisionConfig, self.vision, "vision")
        if isinstance(self.projector, dict):
            self.projector = config_from_dict(ProjectorConfig, self.projector, "projector")
        if isinstance(self.decoder, dict):
            self.decoder = config_from_dict(DecoderConfig, self.decoder, "decoder")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MMGPTConfig:
        return config_from_dict(cls, dict(d), "config")

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> MMGPTConfig:
        try:
            d = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
        return config_from_dict(cls, d, str(path))

    def replace(self, **changes: Any) -> MMGPTConfig:
        return dataclasses.replace(self, **changes)
