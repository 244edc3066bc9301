"""Block-diffusion training attention over the vectorised [noisy copy | clean copy] layout.

A training sequence of length L is fed twice, as one row of length 2L: first the noisy copy (some tokens replaced by
the mask token), then the clean copy. Both copies use positions 0..L-1. With blocks of B tokens:

* a noisy query in block b sees the noisy keys of its own block (bidirectional) and the clean keys of blocks < b;
* a clean query in block b sees the clean keys of blocks <= b (block-causal), as the KV cache will at decode time;
* clean queries never see noisy keys, so the clean copy is exactly what a cache of committed blocks holds.

Right padding is handled with per-row valid lengths: no valid query ever sees a padded key.

Two realisations give the same attention: a dense boolean mask for SDPA (CPU, small runs) and a FlexAttention
BlockMask (CUDA), which skips the empty tiles and so costs far less than 4x a causal pass.
"""

from __future__ import annotations

import torch


def _allowed(q: torch.Tensor, kv: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """The layout rule on broadcastable index tensors (the one definition both realisations share)."""
    q_clean = q >= seq_len
    kv_clean = kv >= seq_len
    q_block = torch.where(q_clean, q - seq_len, q) // block_size
    kv_block = torch.where(kv_clean, kv - seq_len, kv) // block_size
    noisy_to_own_block = ~q_clean & ~kv_clean & (q_block == kv_block)
    noisy_to_clean_past = ~q_clean & kv_clean & (kv_block < q_block)
    clean_block_causal = q_clean & kv_clean & (kv_block <= q_block)
    return noisy_to_own_block | noisy_to_clean_past | clean_block_causal


def _key_valid(kv: torch.Tensor, seq_len: int, lengths: torch.Tensor) -> torch.Tensor:
    pos = torch.where(kv >= seq_len, kv - seq_len, kv)
    return pos < lengths


def dense_mask(
    seq_len: int, block_size: int, lengths: torch.Tensor | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean SDPA mask (True = may attend) of shape [1, 1, 2L, 2L], or [N, 1, 2L, 2L] with per-row `lengths`."""
    idx = torch.arange(2 * seq_len, device=device)
    allowed = _allowed(idx[:, None], idx[None, :], seq_len, block_size)
    if lengths is None:
        return allowed[None, None]
    lengths = lengths.to(device)[:, None, None]
    q_valid = _key_valid(idx[:, None], seq_len, lengths)  # a query is valid where its key would be
    kv_valid = _key_valid(idx[None, :], seq_len, lengths)
    # Padded queries keep the plain rule (their outputs are never scored); valid queries never see padding.
    return (allowed[None] & (kv_valid | ~q_valid))[:, None]


def flex_mask(seq_len: int, block_size: int, lengths: torch.Tensor | None = None, device: torch.device | str = "cuda"):
    """The same rule as a FlexAttention BlockMask (batch size 1 broadcast, or one row per entry of `lengths`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if lengths is None:

        def mask_mod(b, h, q, kv):
            return _allowed(q, kv, seq_len, block_size)

        batch = None
    else:
        lengths = lengths.to(device)

        def mask_mod(b, h, q, kv):
            n = lengths[b]
            return _allowed(q, kv, seq_len, block_size) & (_key_valid(kv, seq_len, n) | ~_key_valid(q, seq_len, n))

        batch = lengths.shape[0]
    return create_block_mask(mask_mod, batch, None, 2 * seq_len, 2 * seq_len, device=device)


def reference_mask(seq_len: int, block_size: int) -> list[list[bool]]:
    """Brute-force statement of the layout, written independently of `_allowed`, for tests."""
    n = 2 * seq_len
    out = [[False] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            qi_clean, kj_clean = i >= seq_len, j >= seq_len
            pi, pj = i % seq_len, j % seq_len
            bi, bj = pi // block_size, pj // block_size
            if not qi_clean and not kj_clean:
                out[i][j] = bi == bj
            elif not qi_clean and kj_clean:
                out[i][j] = bj < bi
            elif qi_clean and kj_clean:
                out[i][j] = bj <= bi
    return out


def layout_position_ids(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions 0..L-1 for the noisy copy, then 0..L-1 again for the clean copy: shape [1, 2L]."""
    pos = torch.arange(seq_len, device=device)
    return torch.cat([pos, pos])[None]


def block_causal_mask(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decode-time attention [1, 1, T, T]: every position sees its own block and all earlier blocks.

    This is the clean copy's rule; with the last block being the one under denoising it is also the noisy copy's
    view (own block bidirectional, earlier blocks clean), so one mask serves both at decode time.
    """
    idx = torch.arange(seq_len, device=device) // block_size
    return (idx[None, :] <= idx[:, None])[None, None]
