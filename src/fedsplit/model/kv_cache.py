"""The key/value cache of one segment: preallocated buffers that new tokens are written into.

Appending by ``torch.cat`` copies the whole cache at every step of every layer, so a decode
step would cost O(context) in copies on top of attention. Here each layer owns one key and
one value buffer with spare room along the sequence axis; a step writes its new tokens into
that room by slicing, and attention reads a view of the filled part. When the room runs out
the buffer is reallocated at twice its size (rounded up to whole blocks), so over ``n``
tokens there are O(log n) reallocations and the copying per token is O(1) amortised.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch

# Tokens per allocation unit: a prefill of a few tokens still reserves room for the decode
# steps that follow, so a short generation never reallocates.
BLOCK = 256


@dataclass
class _Entry:
    key: torch.Tensor  # [B, heads, capacity, head_dim]
    value: torch.Tensor
    filled: int

    @property
    def capacity(self) -> int:
        return self.key.shape[-2]


def _round_up(tokens: int, block: int) -> int:
    return -(-tokens // block) * block


class _LayerViews(MutableMapping):
    """``cache.layers``: layer index -> (key, value) of the current length, as plain tensors.

    Reading gives views of the filled part of the buffers; assigning a (key, value) pair
    makes the cache hold exactly those tensors (the next append then reallocates).
    """

    def __init__(self, cache: KVCache) -> None:
        self._cache = cache

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._cache._entries[layer_idx]
        return entry.key[..., : entry.filled, :], entry.value[..., : entry.filled, :]

    def __setitem__(self, layer_idx: int, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        key, value = pair
        self._cache._entries[layer_idx] = _Entry(key, value, key.shape[-2])

    def __delitem__(self, layer_idx: int) -> None:
        del self._cache._entries[layer_idx]

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._cache._entries))

    def __len__(self) -> int:
        return len(self._cache._entries)


class KVCache:
    """Key/value cache for the layers of one segment, keyed by global layer index.

    Duck-types the ``update(key, value, layer_idx)`` call that Hugging Face attention
    modules make, so the decoder layers run unchanged. All rows share one length:
    sequences are left-padded, so the pad rule covers the cached prefix too. Buffers are
    created on the device and in the dtype of the first key they receive.

    ``layers`` maps each layer index to its (key, value) of the current length; it can be
    assigned (a dict of such pairs) to replace the cache's content, as continuous batching
    does when it merges and splits the caches of several sessions.
    """

    def __init__(self, block: int = BLOCK) -> None:
        self.block = block
        self.length = 0
        self._entries: dict[int, _Entry] = {}

    @property
    def layers(self) -> _LayerViews:
        return _LayerViews(self)

    @layers.setter
    def layers(self, pairs: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._entries = {}
        views = _LayerViews(self)
        for layer_idx, pair in pairs.items():
            views[layer_idx] = pair

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append ``key``/``value`` [B, heads, T, head_dim] to layer ``layer_idx``; return all of it."""
        entry = self._entries.get(layer_idx)
        filled = entry.filled if entry is not None else 0
        if torch.is_grad_enabled() and (
            key.requires_grad or value.requires_grad or (entry is not None and entry.key.requires_grad)
        ):
            # Writing in place would modify tensors that autograd saved for an earlier step's
            # backward; with a graph to keep, concatenate as a plain cache would.
            if entry is not None:
                old_key, old_value = self.layers[layer_idx]
                key, value = torch.cat([old_key, key], dim=-2), torch.cat([old_value, value], dim=-2)
            self._entries[layer_idx] = _Entry(key, value, key.shape[-2])
            return key, value
        if entry is not None and entry.key.shape[:-2] != key.shape[:-2]:
            raise ValueError(
                f"layer {layer_idx}: new keys of shape {tuple(key.shape)} do not fit the cached "
                f"{tuple(entry.key.shape[:-2])} batch rows and heads"
            )
        needed = filled + key.shape[-2]
        if entry is None or needed > entry.capacity:
            entry = self._reallocate(layer_idx, entry, key, value, needed)
        entry.key[..., filled:needed, :] = key
        entry.value[..., filled:needed, :] = value
        entry.filled = needed
        return entry.key[..., :needed, :], entry.value[..., :needed, :]

    def _reallocate(
        self, layer_idx: int, entry: _Entry | None, key: torch.Tensor, value: torch.Tensor, needed: int
    ) -> _Entry:
        grown = max(needed, 2 * entry.capacity) if entry is not None else needed
        capacity = _round_up(grown, self.block)
        new_key = key.new_empty((*key.shape[:-2], capacity, key.shape[-1]))
        new_value = value.new_empty((*value.shape[:-2], capacity, value.shape[-1]))
        if entry is not None and entry.filled:
            new_key[..., : entry.filled, :] = entry.key[..., : entry.filled, :]
            new_value[..., : entry.filled, :] = entry.value[..., : entry.filled, :]
        fresh = _Entry(new_key, new_value, entry.filled if entry is not None else 0)
        self._entries[layer_idx] = fresh
        return fresh

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def nbytes(self) -> int:
        """Bytes reserved by the key and value buffers (spare room included)."""
        return sum(
            e.key.numel() * e.key.element_size() + e.value.numel() * e.value.element_size()
            for e in self._entries.values()
        )

    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only the given batch rows (e.g. when some sequences finished)."""
        for entry in self._entries.values():
            index = torch.as_tensor(rows, dtype=torch.long, device=entry.key.device)
            entry.key, entry.value = entry.key[index], entry.value[index]
