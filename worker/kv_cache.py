"""A batched KV cache that grows in place.

transformers' DynamicLayer appends with ``torch.cat``, copying the whole cache of every
layer at every decode step (20% of a 32-sequence step on CPU, measured with
torch.profiler). These layers write new keys and values into preallocated buffers with
headroom and hand attention views of the filled part; the buffer is reallocated only
when it is full, when rows leave, or when new rows are merged in.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Extra positions allocated whenever a buffer is (re)built: a reallocation every
# HEADROOM decode steps instead of a copy at every step.
HEADROOM = 64


class SlabLayer(DynamicLayer):
    """One layer's keys/values in a [B, heads, capacity, head_dim] buffer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, headroom: int = HEADROOM) -> None:
        super().__init__()
        self.length = keys.shape[2]
        self._k = self._alloc(keys, self.length + headroom)
        self._v = self._alloc(values, self.length + headroom)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    @classmethod
    def stacked(
        cls,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        length: int,
        headroom: int = HEADROOM,
    ) -> SlabLayer:
        """One layer holding the rows of every part, each part's positions right-aligned
        at ``length`` (its left padding zeroed), written into the buffer with one copy."""
        layer = cls.__new__(cls)
        DynamicLayer.__init__(layer)
        layer.length = length
        layer._k = _stack_right_aligned(keys, length, length + headroom)
        layer._v = _stack_right_aligned(values, length, length + headroom)
        layer.dtype, layer.device = keys[0].dtype, keys[0].device
        layer.is_initialized = True
        return layer

    @staticmethod
    def _alloc(src: torch.Tensor, capacity: int) -> torch.Tensor:
        shape = list(src.shape)
        shape[2] = capacity
        buf = src.new_empty(shape)
        buf[:, :, : src.shape[2]] = src
        return buf

    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor:
        return self._k[:, :, : self.length]

    @keys.setter
    def keys(self, value: torch.Tensor) -> None:  # DynamicLayer.__init__ assigns None
        pass

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor:
        return self._v[:, :, : self.length]

    @values.setter
    def values(self, value: torch.Tensor) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):  # type: ignore[override]
        n = key_states.shape[2]
        if self.length + n > self._k.shape[2]:
            grow = max(HEADROOM, self.length // 2, n)
            self._k = self._alloc(self.keys, self.length + grow)
            self._v = self._alloc(self.values, self.length + grow)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def slab_cache(
    keys: list[torch.Tensor], values: list[torch.Tensor], headroom: int = HEADROOM
) -> DynamicCache:
    """A DynamicCache whose layers are SlabLayers holding copies of ``keys``/``values``,
    with room for ``headroom`` more positions before a reallocation."""
    cache = DynamicCache()
    cache.layers = [SlabLayer(k, v, headroom) for k, v in zip(keys, values, strict=True)]
    cache.layer_class_to_replicate = None
    return cache


def _stack_right_aligned(parts: list[torch.Tensor], length: int, capacity: int) -> torch.Tensor:
    first = parts[0]
    rows = sum(p.shape[0] for p in parts)
    buf = first.new_empty((rows, first.shape[1], capacity, first.shape[3]))
    row = 0
    for part in parts:
        n, pad = part.shape[0], length - part.shape[2]
        if pad:  # masked positions must hold finite values (0 * nan is nan in attention)
            buf[row : row + n, :, :pad].zero_()
        buf[row : row + n, :, pad:length] = part
        row += n
    return buf


def stacked_cache(
    parts: list[tuple[list[torch.Tensor], list[torch.Tensor]]], length: int
) -> DynamicCache:
    """A cache of every part's rows (``(keys, values)`` per layer), each part left-padded
    to ``length``: one buffer per layer, filled with one copy of each part (a long prompt
    joining a batch pads every row to its length; chained pad-and-cat copies of that
    were seconds of stall on CPU)."""
    cache = DynamicCache()
    n_layers = len(parts[0][0])
    cache.layers = [
        SlabLayer.stacked([p[0][i] for p in parts], [p[1][i] for p in parts], length)
        for i in range(n_layers)
    ]
    cache.layer_class_to_replicate = None
    return cache


def cache_views(cache: DynamicCache | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer views of the filled part of a cache (no copies)."""
    if cache is None:
        return [], []
    layers: list[SlabLayer] = cache.layers  # type: ignore[assignment]  # built by slab_cache
    return [layer.keys for layer in layers], [layer.values for layer in layers]
