"""The saved HF vision-language models that mmgpt runs through its own modules, recognized by their directory.

``mmgpt.load`` reads such a directory as a model (``mmgpt.checkpoint``); training starts from one
(``model.init_from``), and then the data must be tokenized as that model's processor would: its own tokenizer with
its chat template or prompt format (``load_model_tokenizer``), not mmgpt's default one. Only ``config.json`` is read
to tell the family; nothing is downloaded.

    SmolVLM / Idefics3  -> ``mmgpt.convert.idefics3`` (import and export)
    PaliGemma           -> ``mmgpt.convert.paligemma`` (import and export)
    LLaVA-OneVision     -> ``mmgpt.convert.llava_onevision`` (import and export)
"""

from __future__ import annotations

from pathlib import Path

from mmgpt.convert.idefics3 import is_idefics3_dir
from mmgpt.convert.llava_onevision import is_llava_onevision_dir
from mmgpt.convert.paligemma import is_paligemma_dir
from mmgpt.tokenizer import load_tokenizer


def hf_vlm_family(path: str | Path | None) -> str | None:
    """``"idefics3"`` (SmolVLM too), ``"paligemma"`` or ``"llava_onevision"`` for a saved HF model of that family,
    else None."""
    if path is None or not Path(path).expanduser().is_dir():
        return None
    path = Path(path).expanduser()
    if is_idefics3_dir(path):
        return "idefics3"
    if is_paligemma_dir(path):
        return "paligemma"
    if is_llava_onevision_dir(path):
        return "llava_onevision"
    return None


def load_model_tokenizer(path: str | Path):
    """The tokenizer at ``path`` as the model it belongs to uses it.

    Args:
        path: a saved HF SmolVLM/Idefics3, PaliGemma or LLaVA-OneVision directory (its tokenizer with the processor's
            chat template, or PaliGemma's prompt format as one), or anything ``mmgpt.tokenizer.load_tokenizer``
            reads.
    """
    family = hf_vlm_family(path)
    if family == "idefics3":
        from mmgpt.convert.idefics3 import load_idefics3_tokenizer

        return load_idefics3_tokenizer(Path(path).expanduser())
    if family == "paligemma":
        from mmgpt.convert.paligemma import load_paligemma_tokenizer

        return load_paligemma_tokenizer(Path(path).expanduser())
    if family == "llava_onevision":
        from mmgpt.convert.llava_onevision import load_llava_onevision_tokenizer

        return load_llava_onevision_tokenizer(Path(path).expanduser())
    return load_tokenizer(path)


__all__ = ["hf_vlm_family", "load_model_tokenizer"]
