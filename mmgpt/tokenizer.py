"""The tokenizer: a transformers ``PreTrainedTokenizerFast``, either mmgpt's own or a pretrained LM's.

mmgpt's own is a byte-level BPE (``tokenizers``): any text — any language, emoji — encodes without an unknown
token, even though the shipped vocabulary is trained on the shapes corpus only. The chat/image markers are
special tokens, never split, and its chat template (``NATIVE_CHAT_TEMPLATE``) renders the format every mmgpt
model is trained on.

A pretrained LM's tokenizer (a local HF directory, or a GGUF file) keeps its vocabulary and chat template;
``<image>`` is added as a special token (the model resizes its embeddings to match) and a missing pad token
falls back to eos, as HF does for generation.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mmgpt.assets import ASSETS
from mmgpt.prompts import ASSISTANT, BOS, EOS, IMAGE, PAD, SPECIAL_TOKENS, SYSTEM, USER

# The installed package's copy in a wheel, the repository's assets/ in a checkout (mmgpt/assets.py).
DEFAULT_TOKENIZER = ASSETS / "tokenizer"

# mmgpt's own conversation format as a Jinja chat template (the one ``apply_chat_template`` runs):
#   <|bos|> [<image> x N] <|system|> s <|user|> q1 <|assistant|> a1 <|eos|> <|user|> q2 <|assistant|> ...
# Every image comes first, right after bos, whatever turn it was attached to: a small model trained from scratch
# then always finds its image tokens in the same slots. ``<image>`` markers are removed from the turns' text.
NATIVE_CHAT_TEMPLATE = (
    "{% set ns = namespace(images='') %}"
    "{% for m in messages %}{% set ns.images = ns.images + '" + IMAGE + "' * m['content'].count('" + IMAGE + "') %}"
    "{% endfor %}"
    "{{ bos_token }}{{ ns.images }}"
    "{% for m in messages %}{% set text = m['content'].replace('" + IMAGE + "', '') %}"
    "{% if m['role'] == 'system' %}" + SYSTEM + "{{ text }}"
    "{% elif m['role'] == 'user' %}" + USER + "{{ text }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ text }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

# For a pretrained LM without a chat template of its own (a base model such as GPT-2): plain "User:/Assistant:"
# turns, each assistant turn closed by eos so generation knows where an answer ends.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw ``tokenizers.Tokenizer`` with mmgpt's special tokens and chat template declared."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1_000_000
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE, USER, ASSISTANT, SYSTEM]})
    tok.chat_template = NATIVE_CHAT_TEMPLATE
    tok.padding_side = "left"  # generation pads on the left so every row's last token is real
    return tok


def prepare_pretrained_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make a pretrained LM's tokenizer usable by mmgpt: ``<image>`` special token, pad token, left padding."""
    if IMAGE not in tok.get_vocab():
        tok.add_tokens([IMAGE], special_tokens=True)  # never split; keeps the LM's own special tokens
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # HF's own fallback for generation; padding is masked out anyway
    if tok.chat_template is None:
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def load_vlm_tokenizer(
    hf_dir: str | Path, image_token_id: int | None = None, id_field: str = "image_token_id",
    chat_template: str | None = None, fallback_template: str | None = None,
) -> PreTrainedTokenizerBase:
    """The tokenizer saved with an HF vision-language model, ready for generation: left padding, eos as pad when it
    has none. Unlike ``prepare_pretrained_tokenizer`` nothing is added: the model already has its ``<image>``.

    Args:
        hf_dir: the model's directory (local only).
        image_token_id: the model's image token id (its config's ``id_field``), checked against ``<image>``.
        chat_template: the processor's template, replacing the tokenizer's own (None: keep it).
        fallback_template: the template to use when the tokenizer has none.

    Raises:
        ValueError: the tokenizer's ``<image>`` is not the model's image token.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if image_token_id is not None and tokenizer.convert_tokens_to_ids(IMAGE) != image_token_id:
        raise ValueError(
            f"{hf_dir}: the tokenizer's {IMAGE} is id {tokenizer.convert_tokens_to_ids(IMAGE)}, but the model's "
            f"{id_field} is {image_token_id}"
        )
    if tokenizer.chat_template is None and fallback_template is not None:
        tokenizer.chat_template = fallback_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


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


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer.

    Args:
        path: mmgpt's own tokenizer directory (default: the one shipped in ``assets/tokenizer``), a pretrained
            LM's local HF directory, or a ``.gguf`` file. Nothing is downloaded.

    Returns:
        A tokenizer with ``<image>``, a pad token, a chat template and left padding.
    """
    path = Path(path).expanduser() if path is not None else DEFAULT_TOKENIZER
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        return prepare_pretrained_tokenizer(tok)
    file = path / "tokenizer.json" if path.is_dir() else path
    if path.is_dir() and not file.is_file() and any(path.glob("tokenizer*")):
        # A slow-only tokenizer (e.g. vocab.json + merges.txt): transformers converts it.
        file = path
    if not file.exists():
        hint = " (run `python scripts/train_tokenizer.py` to rebuild it)" if path == DEFAULT_TOKENIZER else ""
        raise FileNotFoundError(f"no tokenizer at {path}: expected a directory with tokenizer.json{hint}")
    if file.is_file():
        raw = Tokenizer.from_file(str(file))
        if USER in raw.get_vocab() and ASSISTANT in raw.get_vocab():
            return wrap(raw)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return prepare_pretrained_tokenizer(tok)


def tokenizer_to_files(tok: PreTrainedTokenizerBase) -> dict[str, str]:
    """The text files of ``tok.save_pretrained`` as ``{name: content}``: a checkpoint carries its tokenizer."""
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(d).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict[str, str] | str) -> PreTrainedTokenizerBase:
    """Rebuild a tokenizer stored with ``tokenizer_to_files`` (or, from older checkpoints, a tokenizer.json
    string)."""
    if isinstance(files, str):
        files = {"tokenizer.json": files}
    with tempfile.TemporaryDirectory() as d:
        for name, content in files.items():
            (Path(d) / Path(name).name).write_text(content, encoding="utf-8")
        if set(files) == {"tokenizer.json"}:
            json.loads(files["tokenizer.json"])  # a clear JSONDecodeError before tokenizers' own message
        return load_tokenizer(d)
