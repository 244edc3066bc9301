"""The KV-cache manager: a pool of cache rows, one per running request, whose slots are addressed by absolute
position.

Transformers' `StaticCache` appends at a running counter; block diffusion needs to *overwrite*: the active block is
recomputed every forward and its keys/values must land in the same slots each time, and a finished block is written
once more, with its final tokens, before it counts as cached. So before each forward the model runner names the pool
rows the forward runs on, the slot of every fed query and how many leading slots it may read (`bind`); every layer
scatters its new keys/values there, and attention runs over slots [0, kv_len) only, so its cost grows with what has
been decoded, not with the allocated length. Which of those slots a query may read is the 4D boolean mask the runner
passes; the cache itself knows nothing about blocks.

Rows are a fixed pool (`max_rows`, the scheduler's limit on running requests), handed out by `allocate` and returned
by `free`. Running requests always occupy rows [0, n): `free` moves the last row's contents into the freed one (one
copy per layer of the slots it uses, once per finished request), so a forward over the running requests reads a
*view* of the buffers, never a gathered copy. The slot length grows on demand (`reserve`, rounded up to 64 slots):
buffers are reallocated and copied only when a longer request arrives.

Buffers are [rows, kv_heads, length, head_dim] per layer, allocated on the first forward (dtype, device and head
sizes come from the model there).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

_LENGTH_STEP = 64


class _PoolLayer(CacheLayerMixin):
    """One layer's buffers; writes go to the rows and slots the owning pool is bound to."""

    is_compileable = False

    def __init__(self, owner: "KVCachePool"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        shape = (self.owner.max_rows, key_states.shape[1], self.owner.length)
        self.keys = torch.zeros(*shape, key_states.shape[-1], dtype=self.dtype, device=self.device)
        self.values = torch.zeros(*shape, value_states.shape[-1], dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def grow(self, length: int) -> None:
        if not self.is_initialized:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], length, old.shape[3])
            new[:, :, :old.shape[2]] = old
            setattr(self, name, new)

    def move_row(self, src: int, dst: int, used: int) -> None:
        if self.is_initialized:
            self.keys[dst, :, :used] = self.keys[src, :, :used]
            self.values[dst, :, :used] = self.values[src, :, :used]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pool = self.owner
        index, lo, hi = pool.write_index, pool.row_start, pool.row_end
        if index is None or index.shape != (key_states.shape[0], key_states.shape[2]) or hi - lo != index.shape[0]:
            raise RuntimeError("KVCachePool: bind() must name the rows and one slot per fed query before each forward")
        keys, values = self.keys[lo:hi], self.values[lo:hi]
        if index.shape[0] == 1:  # the common single-sequence case: one index_copy_ per tensor
            keys.index_copy_(2, index[0], key_states)
            values.index_copy_(2, index[0], value_states)
        else:
            rows = torch.arange(index.shape[0], device=index.device)[:, None]
            # advanced indices on dims 0 and 2 put their broadcast shape [B, Q] first: [B, Q, H, D]
            keys[rows, :, index] = key_states.transpose(1, 2)
            values[rows, :, index] = value_states.transpose(1, 2)
        return keys[:, :, :pool.kv_len], values[:, :, :pool.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_len, 0

    def get_seq_length(self) -> int:
        # Only consulted by decoders when no position_ids are given; the runner always passes them.
        return 0

    def get_max_length(self) -> int:
        return self.owner.length


class KVCachePool(Cache):
    """Per-layer buffers of `max_rows` rows; plug into any HF decoder as `past_key_values` after `bind`."""

    def __init__(self, num_layers: int, max_rows: int, length: int = _LENGTH_STEP):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.length = _round_up(length)
        self.used = 0  # rows [0, used) belong to requests
        self.write_index: torch.Tensor | None = None
        self.row_start = self.row_end = 0
        self.kv_len = 0
        super().__init__(layers=[_PoolLayer(self) for _ in range(num_layers)])

    # ------------------------------------------------------------------------------------------- rows
    @property
    def free_rows(self) -> int:
        return self.max_rows - self.used

    def allocate(self) -> int:
        if self.used >= self.max_rows:
            raise RuntimeError("KVCachePool: no free row")
        self.used += 1
        return self.used - 1

    def free(self, row: int, last_row_slots: int) -> int | None:
        """Return `row` to the pool. The last used row moves into it (its first `last_row_slots` slots are copied);
        returns the row that moved (whose owner now lives at `row`), or None when `row` was the last one."""
        if not 0 <= row < self.used:
            raise RuntimeError(f"KVCachePool: row {row} is not in use")
        last = self.used - 1
        self.used -= 1
        if row == last:
            return None
        for layer in self.layers:
            layer.move_row(last, row, last_row_slots)
        return last

    def reserve(self, length: int) -> None:
        """Make room for `length` slots per row (grows, never shrinks)."""
        if length > self.length:
            self.length = _round_up(length)
            for layer in self.layers:
                layer.grow(self.length)

    # ------------------------------------------------------------------------------------------- forward
    def bind(self, row_start: int, write_index: torch.Tensor, kv_len: int) -> None:
        """The next forward runs on rows [row_start, row_start + B) with query slots `write_index` [B, Q] (long)
        and reads slots [0, kv_len), which must include every written slot."""
        if not 0 < kv_len <= self.length:
            raise ValueError(f"kv_len must be in [1, {self.length}], got {kv_len}")
        if row_start < 0 or row_start + write_index.shape[0] > self.used:
            raise ValueError("KVCachePool: the forward's rows are not all in use")
        self.row_start, self.row_end = row_start, row_start + write_index.shape[0]
        self.write_index, self.kv_len = write_index, kv_len


def _round_up(length: int) -> int:
    return -(-max(length, 1) // _LENGTH_STEP) * _LENGTH_STEP
