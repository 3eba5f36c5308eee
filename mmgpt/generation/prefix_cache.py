"""``PrefixCache``: the KV caches of recent single-prompt generations, kept so that a longer prompt that starts
with the same tokens prefills only what is new.

A chat grows turn by turn (user, assistant, user, ...) and each turn's prompt is the previous one plus the reply
and the new message. litgpt's chat keeps its KV cache across turns; HF's ``generate`` takes ``past_key_values``
for the same purpose. Here a generation of one row (no padding, no beams) leaves a snapshot of its cache — the
keys and values of every slot it wrote, prompt and fed tokens, with their token ids — and the next generation
loads the longest usable common prefix of token ids into its fresh cache and runs the model over the rest only
(``DecodeState.prefill``). The match is by token ids, not by messages: a reply may tokenize differently once it
is rendered back into the conversation (a stop string cut, stripped spaces), and the prefix then ends where the
ids part.

A cached prefix is used only where it is exactly what a full prefill would compute, up to float rounding:

* the same weights and compute settings (``weights_key``): any parameter or buffer replaced, moved or changed in
  place, train mode or autocast changes the key, and the entries made under another key are dropped;
* the same images: the slots of every image inside the prefix hold the same embeddings, compared by value
  (``torch.equal``), so an image re-read from its file matches and any other image ends the prefix at its first
  slot;
* causal attention (with ``decoder.attention="prefix"`` every prompt token sees the whole prompt, so an earlier
  turn's keys change when the prompt grows) and a cache that can be copied (the native decoder, and HF's
  ``DynamicCache`` of plain full-attention layers). ``DecodeState`` checks these and prefills in full otherwise.

Memory: at most ``max_entries`` snapshots, each one row of the cache up to the tokens it holds (at most
``block_size``: ``2 * n_layer * n_query_groups * length * head_size`` numbers in the model's dtype, on its device)
plus the embeddings of its images. A conversation keeps one entry (storing a turn drops the entries whose whole
prompt it starts with, its earlier turns), and beyond ``max_entries`` the least recently used goes. Lookups and
stores take the cache's own lock, and entries never change once stored, so threads may share one (a ``Pipeline``
is shared across threads).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

# One layer's cached (keys, values), each (1, n_query_groups, length, head_size): HF's "legacy cache" layout.
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)  # compared by identity: == on its tensors would be elementwise
class CachedPrefix:
    """One row's KV cache after a generation, and what it was computed from."""

    key: tuple  # weights_key of the decoder (and the compute settings) that wrote it
    ids: torch.Tensor  # (L,) CPU long: the token in each cache slot
    prompt_len: int  # the first prompt_len slots are the prompt; the rest, tokens fed while generating
    image_starts: tuple[int, ...]  # the first slot of each image's placeholder run, in order
    image_embeds: torch.Tensor | None  # (len(image_starts), image_seq_len, n_embd), spliced into those runs
    kv: tuple[LayerKV, ...]  # per layer, keys and values of slots [0, L)

    @property
    def nbytes(self) -> int:
        tensors = [t for layer in self.kv for t in layer]
        if self.image_embeds is not None:
            tensors.append(self.image_embeds)
        return sum(t.numel() * t.element_size() for t in tensors)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version  # bumped by every in-place change (optimizer steps, load_state_dict, copy_)
    except RuntimeError:  # an inference tensor keeps no version counter; changing it means replacing it
        return -1


def weights_key(decoder: torch.nn.Module, device: torch.device) -> tuple:
    """What a decoder's keys and values depend on besides the tokens: the identity, storage, version, dtype and
    shape of every parameter and buffer (KV caches excluded), train mode, and the autocast state on ``device``.

    Cheap (a few hundred tensors for a 30-layer LM) and exact for every change made through tensors. A change
    that keeps every tensor (a switch such as peft's ``disable_adapter_layers``) is not seen:
    ``PrefixCache.clear()`` after one.
    """
    buffers = (b for name, b in decoder.named_buffers() if "kv_cache" not in name)
    tensors = tuple(
        (id(t), t.data_ptr(), _version(t), t.dtype, tuple(t.shape))
        for t in itertools.chain(decoder.parameters(), buffers)
    )
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    return (id(decoder), decoder.training, str(device), autocast, tensors)


def image_starts(ids: torch.Tensor, image_token_id: int, image_seq_len: int) -> tuple[int, ...]:
    """The first slot of each image's run of ``image_seq_len`` placeholders in a prompt ``ids`` ``(T,)``."""
    slots = (ids == image_token_id).nonzero().squeeze(1)
    return tuple(slots[::image_seq_len].tolist()) if image_seq_len else ()


class PrefixCache:
    """A small LRU of ``CachedPrefix`` snapshots; ``DecodeState`` looks prompts up in it and stores into it.

    Args:
        max_entries: the most snapshots kept (the memory bound: see the module docstring). One is litgpt's
            chat (one conversation); a few let several conversations on a shared model take turns without
            evicting each other.
    """

    def __init__(self, max_entries: int = 4) -> None:
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: OrderedDict[int, CachedPrefix] = OrderedDict()  # by id(entry); most recently used last
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """The memory the snapshots hold."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def lookup(
        self, key: tuple, ids: torch.Tensor, starts: tuple[int, ...], image_embeds: torch.Tensor | None
    ) -> tuple[CachedPrefix, int] | None:
        """The entry with the longest usable prefix of a prompt, and that prefix's length.

        Args:
            key: ``weights_key`` of the decoder about to run; entries made under another key are dropped.
            ids: ``(T,)`` CPU token ids of the prompt.
            starts: ``image_starts`` of the prompt.
            image_embeds: ``(len(starts), image_seq_len, n_embd)`` the prompt's images, or ``None``.

        Returns:
            ``(entry, P)`` with ``0 < P < T``: slots ``[0, P)`` of ``entry.kv`` are the prompt's (at least one
            token is left to prefill, for the next-token logits); ``None`` when no entry shares a prefix.
        """
        with self._lock:
            for stale in [k for k, e in self._entries.items() if e.key != key]:
                del self._entries[stale]
            best, best_len = None, 0
            for k, entry in self._entries.items():
                n = _usable_prefix(entry, ids, starts, image_embeds)
                if n > best_len:
                    best, best_len = k, n
            if best is None:
                return None
            self._entries.move_to_end(best)
            return self._entries[best], best_len

    def store(self, entry: CachedPrefix) -> None:
        """Keep ``entry`` as the most recently used. Entries whose whole prompt it starts with (the earlier turns
        of its conversation) go, and the least recently used beyond ``max_entries``."""
        with self._lock:
            for old in [k for k, e in self._entries.items() if _continues(entry, e)]:
                del self._entries[old]
            self._entries[id(entry)] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    # A copy of a pipeline (copy.deepcopy, as documented for parallel decoding) or a pickled one gets an empty
    # cache of its own: a threading.Lock can be neither copied nor pickled, and the snapshots belong to the
    # original's model.
    def __deepcopy__(self, memo: dict) -> PrefixCache:
        return PrefixCache(self.max_entries)

    def __copy__(self) -> PrefixCache:
        return PrefixCache(self.max_entries)

    def __getstate__(self) -> dict:
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_entries"])

    def __repr__(self) -> str:
        return f"PrefixCache(max_entries={self.max_entries}, entries={len(self)})"


def _usable_prefix(
    entry: CachedPrefix, ids: torch.Tensor, starts: tuple[int, ...], image_embeds: torch.Tensor | None
) -> int:
    """How many leading slots of ``entry`` a prompt may take: the common prefix of token ids (short of the prompt's
    last token), cut at the first image of the prompt inside it that is not the entry's image in the same slots."""
    m = min(entry.ids.numel(), ids.numel() - 1)
    differ = (entry.ids[:m] != ids[:m]).nonzero()
    n = int(differ[0]) if differ.numel() else m
    for j, start in enumerate(starts):
        if start >= n:
            break
        same = (
            j < len(entry.image_starts) and entry.image_starts[j] == start and image_embeds is not None
            and entry.image_embeds is not None and torch.equal(entry.image_embeds[j], image_embeds[j])
        )
        if not same:
            return start  # the image's run and everything after it are prefilled again
    return n


def _continues(new: CachedPrefix, old: CachedPrefix) -> bool:
    """Whether ``new``'s slots begin with ``old``'s whole prompt, images included: ``new`` then serves every prompt
    that ``old`` would, except one that repeats ``old``'s reply where ``new`` has another."""
    n, k = old.prompt_len, len(old.image_starts)
    return (
        new.key == old.key and new.ids.numel() >= n and torch.equal(new.ids[:n], old.ids[:n])
        and new.image_starts[:k] == old.image_starts
        and (k == 0 or torch.equal(new.image_embeds[:k], old.image_embeds))
    )
