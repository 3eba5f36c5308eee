"""Conversion between mmgpt's native decoder and HF transformers Llama-family checkpoints.

mmgpt fuses q/k/v and gate/up into single matmuls; HF keeps them apart. Both use the "rotate half" RoPE
layout, so weights move across by concatenation/splitting only — no permutation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mmgpt.config import DecoderConfig
from mmgpt.models.decoder import Decoder

# DecoderConfig field -> LlamaConfig field, for the sizes both have.
_CONFIG_NAMES = {
    "vocab_size": "vocab_size",
    "n_embd": "hidden_size",
    "intermediate_size": "intermediate_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_query_groups": "num_key_value_heads",
    "block_size": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}


def to_hf_llama_config(config: DecoderConfig, **extra):
    """A ``transformers.LlamaConfig`` with the same architecture as ``config``."""
    from transformers import LlamaConfig

    sizes = {hf: getattr(config, ours) for ours, hf in _CONFIG_NAMES.items()}
    return LlamaConfig(**sizes, rope_theta=config.rope_base, attention_bias=False, mlp_bias=False, **extra)


def from_hf_llama_config(hf_config) -> DecoderConfig:
    """The native ``DecoderConfig`` for a ``transformers.LlamaConfig`` (or a compatible Llama-family config)."""
    rope_theta = getattr(hf_config, "rope_theta", None)
    if rope_theta is None:  # transformers >= 5 keeps it in rope_parameters
        rope_theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10_000.0)
    sizes = {ours: getattr(hf_config, hf) for ours, hf in _CONFIG_NAMES.items()}
    sizes["tie_embeddings"] = bool(sizes["tie_embeddings"])
    return DecoderConfig(**sizes, rope_base=float(rope_theta))


def check_hf_llama_config(hf_config, where: str = "config") -> None:
    """Raise unless ``hf_config`` is a Llama that the native decoder reproduces exactly.

    ``from_hf_llama_config`` reads only the sizes; this checks the rest, which the native decoder fixes: SiLU
    SwiGLU, no biases, plain RoPE, head size ``hidden_size / num_attention_heads``.

    Args:
        hf_config: a ``transformers.LlamaConfig`` (or a config of another ``model_type``, which is rejected).
        where: how to name the config in the error, e.g. ``"text_config"`` inside a LLaVA config.

    Raises:
        ValueError: naming every field that does not fit, with the value the native decoder needs.
    """
    problems = []
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "llama":
        problems.append(f"{where}.model_type={model_type!r} (expected 'llama')")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        problems.append(f"{where}.hidden_act={hf_config.hidden_act!r} (expected 'silu': the decoder is SwiGLU)")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, name, False):
            problems.append(f"{where}.{name}=True (expected False: the native decoder has no biases)")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        problems.append(
            f"{where}.head_dim={head_dim} (expected hidden_size / num_attention_heads = "
            f"{hf_config.hidden_size // hf_config.num_attention_heads})"
        )
    # transformers >= 5 keeps the RoPE variant in rope_parameters; older versions in rope_scaling (None = plain).
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"{where} RoPE type {rope_type!r} (expected 'default': no RoPE scaling)")
    if problems:
        raise ValueError("the Llama config does not fit mmgpt's decoder: " + "; ".join(problems))


def to_hf_llama_state_dict(state_dict: dict[str, torch.Tensor], config: DecoderConfig) -> dict[str, torch.Tensor]:
    """Native decoder state dict (keys relative to the decoder) -> ``LlamaForCausalLM`` state dict."""
    hs = config.head_size
    q_dim, kv_dim = config.n_head * hs, config.n_query_groups * hs
    out = {"model.embed_tokens.weight": state_dict["wte.weight"], "model.norm.weight": state_dict["ln_f.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state_dict["lm_head.weight"]
    for i in range(config.n_layer):
        p, hf = f"h.{i}.", f"model.layers.{i}."
        q, k, v = state_dict[p + "attn.qkv.weight"].split((q_dim, kv_dim, kv_dim), dim=0)
        gate, up = state_dict[p + "mlp.fc.weight"].chunk(2, dim=0)
        out.update({
            hf + "input_layernorm.weight": state_dict[p + "norm_1.weight"],
            hf + "post_attention_layernorm.weight": state_dict[p + "norm_2.weight"],
            hf + "self_attn.q_proj.weight": q,
            hf + "self_attn.k_proj.weight": k,
            hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": state_dict[p + "attn.proj.weight"],
            hf + "mlp.gate_proj.weight": gate,
            hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": state_dict[p + "mlp.proj.weight"],
        })
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_llama_state_dict(hf: dict[str, torch.Tensor], config: DecoderConfig) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` state dict -> native decoder state dict (keys relative to the decoder)."""
    out = {"wte.weight": hf["model.embed_tokens.weight"], "ln_f.weight": hf["model.norm.weight"]}
    out["lm_head.weight"] = hf["model.embed_tokens.weight"] if config.tie_embeddings else hf["lm_head.weight"]
    for i in range(config.n_layer):
        p, h = f"h.{i}.", f"model.layers.{i}."
        out.update({
            p + "norm_1.weight": hf[h + "input_layernorm.weight"],
            p + "norm_2.weight": hf[h + "post_attention_layernorm.weight"],
            p + "attn.qkv.weight": torch.cat([hf[h + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            p + "attn.proj.weight": hf[h + "self_attn.o_proj.weight"],
            p + "mlp.fc.weight": torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]),
            p + "mlp.proj.weight": hf[h + "mlp.down_proj.weight"],
        })
    return out


def load_hf_llama_decoder(path: str | Path, dtype: torch.dtype | None = None) -> Decoder:
    """A native ``Decoder`` with the weights of an HF Llama-family directory (``config.json`` + safetensors).

    Reads the safetensors directly, without building the HF model (``decoder.backend="native"`` goes through
    ``AutoModelForCausalLM`` instead, which also takes ``.gguf`` files and resizes the vocabulary for training).

    Args:
        path: a directory as ``LlamaForCausalLM.save_pretrained`` writes it (one or several ``*.safetensors``).
        dtype: cast the weights to this dtype; ``None`` keeps the file's.

    Returns:
        The decoder, in eval mode.
    """
    from transformers import AutoConfig

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise FileNotFoundError(f"{path}: expected an HF model directory with config.json and *.safetensors")
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_hf_llama_config(hf_config, where=f"{path}/config.json")
    config = from_hf_llama_config(hf_config)
    hf_state = {}
    for f in files:
        hf_state.update(load_file(f))
    decoder = Decoder(config)
    decoder.load_state_dict(from_hf_llama_state_dict(hf_state, config))
    return decoder.to(dtype).eval() if dtype is not None else decoder.eval()
