"""EfficientNet-Lite0 weights -> timm checkpoint: ``mmgpt convert efficientnet-lite0`` (mmgpt/commands/convert.py).

    python scripts/convert_efficientnet_lite0.py      # -> ~/.cache/mmgpt/tf_efficientnet_lite0.safetensors
"""

from functools import partial

from mmgpt.commands import convert

main = partial(convert.efficientnet_lite0, prog="convert_efficientnet_lite0.py")

if __name__ == "__main__":
    main()
