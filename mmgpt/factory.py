"""``create_model``: the one way to build an ``MMGPT`` from a config, with pretrained weights when asked.

The decoders never read files: a pretrained LM's ``config.json`` and weights are read here, through the
converters. (The vision tower reads its own ``vision.checkpoint_path``, through timm's loader, as timm models do.)
"""

from __future__ import annotations

from mmgpt.config import MMGPTConfig
from mmgpt.convert.hf_causal_lm import load_pretrained_decoder, resolve_hf_config
from mmgpt.models.mmgpt import MMGPT


def create_model(config: MMGPTConfig, pretrained: bool = False) -> MMGPT:
    """Build an ``MMGPT`` (as ``timm.create_model`` builds a backbone).

    Args:
        config: the model. With ``decoder.hf_path`` set and ``decoder.hf_config`` not yet filled, the pretrained
            LM's own config is read from that local path and kept in the model's config, so a saved model
            rebuilds without it.
        pretrained: also load the pretrained LM's weights from ``decoder.hf_path`` into the decoder (training's
            first stage; a trained or exported model carries its weights itself).

    Returns:
        The model, in training mode, on the CPU.
    """
    decoder = config.decoder
    if decoder.hf_path and decoder.hf_config is None:
        config = config.replace(decoder=resolve_hf_config(decoder))
    model = MMGPT(config)
    if pretrained:
        if not config.decoder.hf_path:
            raise ValueError("pretrained=True loads decoder.hf_path, which is not set")
        load_pretrained_decoder(model.decoder, config.decoder)
    return model
