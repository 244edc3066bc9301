"""A preallocated KV cache whose slots are addressed by absolute position, for block-diffusion decoding.

Transformers' `StaticCache` appends at a running counter; block diffusion needs to *overwrite*: the active block is
recomputed every forward and its keys/values must land in the same slots each time, and a finished block is written
once more, with its final tokens, before it counts as cached. So each forward the engine names the slot of every fed
query and how many leading slots this forward may read (`set_write_index(index, kv_len)`), every layer scatters its
new keys/values there, and attention runs over slots [0, kv_len) only, so its cost grows with what has been decoded,
not with the preallocated length. Which of those slots a query may read (block-causal, filled slots only) is the 4D
boolean mask the engine passes ([batch, 1, queries, kv_len]); the cache itself knows nothing about blocks.

The buffer is [batch, kv_heads, max_len, head_dim] per layer, allocated on the first forward (dtype, device and
head sizes come from the model there). Nothing is ever copied or concatenated: the tensors handed to attention are
views of the leading kv_len slots of the buffers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    """One layer's buffers; writes go to the slots named by the owning cache's current write index."""

    is_compileable = False

    def __init__(self, owner: "SlotKVCache", max_len: int):
        super().__init__()
        self.owner = owner
        self.max_len = max_len

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        self.keys = torch.zeros(batch, heads, self.max_len, key_states.shape[-1], dtype=self.dtype, device=self.device)
        self.values = torch.zeros(batch, heads, self.max_len, value_states.shape[-1], dtype=self.dtype,
                                  device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        index = self.owner.write_index
        if index is None or index.shape != (key_states.shape[0], key_states.shape[2]):
            raise RuntimeError("SlotKVCache: set_write_index() must name one slot per fed query before each forward")
        if index.shape[0] == 1:  # the common single-sequence case: one index_copy_ per tensor
            self.keys.index_copy_(2, self.owner.write_row, key_states)
            self.values.index_copy_(2, self.owner.write_row, value_states)
        else:
            rows = torch.arange(index.shape[0], device=index.device)[:, None]
            # advanced indices on dims 0 and 2 put their broadcast shape [B, Q] first: [B, Q, H, D]
            self.keys[rows, :, index] = key_states.transpose(1, 2)
            self.values[rows, :, index] = value_states.transpose(1, 2)
        n = self.owner.kv_len
        return self.keys[:, :, :n], self.values[:, :, :n]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_len, 0

    def get_seq_length(self) -> int:
        # Only consulted by decoders when no position_ids are given; the engine always passes them.
        return 0

    def get_max_length(self) -> int:
        return self.max_len


class SlotKVCache(Cache):
    """Per-layer preallocated buffers of `max_len` slots; plug into any HF decoder as `past_key_values`."""

    def __init__(self, num_layers: int, max_len: int):
        self.write_index: torch.Tensor | None = None
        self.write_row: torch.Tensor | None = None  # write_index[0] of a single sequence
        self.max_len = max_len
        self.kv_len = max_len
        super().__init__(layers=[_SlotLayer(self, max_len) for _ in range(num_layers)])

    def set_write_index(self, index: torch.Tensor, kv_len: int | None = None) -> None:
        """Slots [B, Q] (long) for the next forward's queries, in feed order; attention reads slots [0, kv_len)
        (default: all), which must include every written slot."""
        kv_len = self.max_len if kv_len is None else kv_len
        if not 0 < kv_len <= self.max_len:
            raise ValueError(f"kv_len must be in [1, {self.max_len}], got {kv_len}")
        self.write_index, self.kv_len = index, kv_len
        self.write_row = index[0] if index.shape[0] == 1 else None
