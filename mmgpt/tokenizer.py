"""The tokenizer: a byte-level BPE (``tokenizers``) wrapped as a transformers ``PreTrainedTokenizerFast``.

Byte-level means any text — any language, emoji — encodes without an unknown token, even though the shipped
vocabulary is trained on the shapes corpus only. The chat/image markers are special tokens, never split.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmgpt.prompts import ASSISTANT, BOS, EOS, IMAGE, PAD, SPECIAL_TOKENS, SYSTEM, USER

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_TOKENIZER = ASSETS / "tokenizer"


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw ``tokenizers.Tokenizer`` with mmgpt's special tokens declared."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1_000_000
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE, USER, ASSISTANT, SYSTEM]})
    tok.padding_side = "left"  # generation pads on the left so every row's last token is real
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; special tokens get ids 0..6 in ``SPECIAL_TOKENS`` order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols are always in the vocabulary, so nothing is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap(tokenizer)


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with ``save_pretrained`` (default: the one shipped in ``assets/tokenizer``)."""
    path = Path(path) if path is not None else DEFAULT_TOKENIZER
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        hint = " (run `python scripts/train_tokenizer.py` to rebuild it)" if path == DEFAULT_TOKENIZER else ""
        raise FileNotFoundError(f"no tokenizer at {path}: expected a directory with tokenizer.json{hint}")
    return wrap(Tokenizer.from_file(str(file)))


def tokenizer_from_json(data: str) -> PreTrainedTokenizerFast:
    """Rebuild a tokenizer from ``tokenizer.backend_tokenizer.to_str()`` (as stored inside checkpoints)."""
    return wrap(Tokenizer.from_str(data))
