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


# ------------------------------------------------------------------------------------------------- drafter layout
# A gated drafter (ar2dlm.drafter.gated) keeps its clean stream exactly the AR parent's function, so clean queries are
# token-causal (a clean query sees clean keys at positions <= its own), not block-causal as in the dLM layout above.
# Noisy (mask) queries keep the dLM rule: their own block both ways, and the clean keys of earlier blocks.


def _drafter_allowed(q_pos, q_clean, kv_pos, kv_clean, block_size: int, causal_in_block: bool = False):
    """The drafter rule on broadcastable (position, is-clean) tensors; the one definition every drafter mask uses.

    `causal_in_block` makes noisy queries causal inside their block too: with no mask token in it, such a block is
    the parent continuing the clean prefix, which is how the held-out check rolls out the parent's greedy tokens."""
    q_block, kv_block = q_pos // block_size, kv_pos // block_size
    clean_token_causal = q_clean & kv_clean & (kv_pos <= q_pos)
    in_block = (kv_pos <= q_pos) if causal_in_block else True
    noisy_to_own_block = ~q_clean & ~kv_clean & (q_block == kv_block) & in_block
    noisy_to_clean_past = ~q_clean & kv_clean & (kv_block < q_block)
    return clean_token_causal | noisy_to_own_block | noisy_to_clean_past


def _layout_index(idx: torch.Tensor, seq_len: int, clean_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, is_clean) of layout slots: [noisy | clean] (the dLM training layout) or [clean | noisy] (a cache
    holding the clean half, then the noisy half appended)."""
    second_half = idx >= seq_len
    is_clean = ~second_half if clean_first else second_half
    return torch.where(second_half, idx - seq_len, idx), is_clean


def _with_lengths(allowed: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor, lengths: torch.Tensor | None):
    """[1|N, 1, Q, K]: valid queries lose the padded keys; padded queries keep the rule (never scored)."""
    if lengths is None:
        return allowed[None, None]
    n = lengths[:, None, None]
    return (allowed[None] & ((kv_pos[None, None, :] < n) | ~(q_pos[None, :, None] < n)))[:, None]


def drafter_dense_mask(
    seq_len: int, block_size: int, lengths: torch.Tensor | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean SDPA mask of the drafter over the [noisy | clean] layout (as `dense_mask`): [1|N, 1, 2L, 2L]."""
    pos, clean = _layout_index(torch.arange(2 * seq_len, device=device), seq_len, clean_first=False)
    allowed = _drafter_allowed(pos[:, None], clean[:, None], pos[None, :], clean[None, :], block_size)
    return _with_lengths(allowed, pos, pos, None if lengths is None else lengths.to(device))


def drafter_noisy_mask(
    seq_len: int, block_size: int, lengths: torch.Tensor | None = None, device: torch.device | str = "cpu",
    causal_in_block: bool = False,
) -> torch.Tensor:
    """Mask of the noisy half run on top of a cache that already holds the clean half: queries are the L noisy slots,
    keys are [clean | noisy] (the cache order); shape [1|N, 1, L, 2L]. These are the noisy rows of
    `drafter_dense_mask` with the two key halves swapped."""
    q_pos = torch.arange(seq_len, device=device)
    kv_pos, kv_clean = _layout_index(torch.arange(2 * seq_len, device=device), seq_len, clean_first=True)
    allowed = _drafter_allowed(q_pos[:, None], torch.zeros_like(q_pos, dtype=torch.bool)[:, None], kv_pos[None, :],
                               kv_clean[None, :], block_size, causal_in_block)
    return _with_lengths(allowed, q_pos, kv_pos, None if lengths is None else lengths.to(device))


def drafter_flex_mask(
    seq_len: int, block_size: int, lengths: torch.Tensor | None = None, device: torch.device | str = "cuda",
    noisy_only: bool = False, causal_in_block: bool = False,
):
    """The drafter rule as a FlexAttention BlockMask: the whole [noisy | clean] layout (2L x 2L), or with
    `noisy_only` the noisy half over a clean cache (L x 2L, keys [clean | noisy]), as `drafter_noisy_mask`.
    (Hugging Face's flex path would add a boolean tensor mask to the scores: flex needs its own BlockMask.)"""
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = None if lengths is None else lengths.to(device)

    def mask_mod(b, h, q, kv):
        if noisy_only:
            q_pos, q_clean = q, q < 0  # every query is a noisy slot
        else:
            q_pos, q_clean = _layout_index(q, seq_len, clean_first=False)
        kv_pos, kv_clean = _layout_index(kv, seq_len, clean_first=noisy_only)
        allowed = _drafter_allowed(q_pos, q_clean, kv_pos, kv_clean, block_size, causal_in_block)
        if lengths is None:
            return allowed
        n = lengths[b]
        return allowed & ((kv_pos < n) | ~(q_pos < n))

    batch = None if lengths is None else lengths.shape[0]
    q_len = seq_len if noisy_only else 2 * seq_len
    return create_block_mask(mask_mod, batch, None, q_len, 2 * seq_len, device=device)
