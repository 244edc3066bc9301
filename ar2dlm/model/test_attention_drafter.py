"""The drafter attention layout: token-causal clean stream, dLM rule for noisy queries; dense, over-cache and flex."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ar2dlm.model import attention
from ar2dlm.model.attention import dense_mask, drafter_dense_mask, drafter_flex_mask, drafter_noisy_mask

LENGTHS = (1, 5, 7, 12, 13)
BLOCKS = (1, 2, 3, 4, 8)


def reference(seq_len: int, block_size: int) -> torch.Tensor:
    """Brute force over the [noisy | clean] layout, written from the rule's statement."""
    n = 2 * seq_len
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            qi_clean, kj_clean = i >= seq_len, j >= seq_len
            pi, pj = i % seq_len, j % seq_len
            if qi_clean:
                out[i, j] = kj_clean and pj <= pi  # the parent: token-causal, never a noisy key
            elif kj_clean:
                out[i, j] = pj // block_size < pi // block_size  # the clean prefix before the block
            else:
                out[i, j] = pj // block_size == pi // block_size  # its own block, both ways
    return out


def padded(ref: torch.Tensor, seq_len: int, length: int) -> torch.Tensor:
    pos = torch.arange(ref.shape[0]) % seq_len
    valid = pos < length
    return ref & (valid[None, :] | ~valid[:, None])


def swap_key_halves(mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[..., noisy | clean] keys -> [..., clean | noisy] keys (the order of a cache that holds the clean half)."""
    return torch.cat([mask[..., seq_len:], mask[..., :seq_len]], dim=-1)


def test_layout_by_hand():
    # L=4, B=2: noisy rows 0-3, clean rows 4-7.
    expected = torch.tensor(
        [
            # noisy keys   clean keys
            [1, 1, 0, 0, 0, 0, 0, 0],  # noisy block 0: own block only
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],  # noisy block 1: own block + clean block 0
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 0, 0, 0],  # clean: token-causal (the dLM layout would give row 4 key 5 too)
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(reference(4, 2), expected)
    assert torch.equal(drafter_dense_mask(4, 2)[0, 0], expected)


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("block_size", BLOCKS)
def test_dense_mask_equals_reference_and_differs_from_dlm_only_in_the_clean_stream(seq_len, block_size):
    mask = drafter_dense_mask(seq_len, block_size)[0, 0]
    assert torch.equal(mask, reference(seq_len, block_size))
    dlm = dense_mask(seq_len, block_size)[0, 0]
    assert torch.equal(mask[:seq_len], dlm[:seq_len])  # noisy queries: the dLM rule
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    assert torch.equal(mask[seq_len:, seq_len:], causal) and not mask[seq_len:, :seq_len].any()
    assert mask.any(-1).all()  # no empty row (SDPA would return NaN)


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("block_size", BLOCKS)
def test_masks_with_lengths(seq_len, block_size):
    lengths = torch.tensor(sorted({seq_len, max(1, seq_len - 1), max(1, seq_len // 2), 1}, reverse=True))
    dense = drafter_dense_mask(seq_len, block_size, lengths)
    noisy = drafter_noisy_mask(seq_len, block_size, lengths)
    assert dense.shape == (len(lengths), 1, 2 * seq_len, 2 * seq_len)
    assert noisy.shape == (len(lengths), 1, seq_len, 2 * seq_len)
    for row, n in enumerate(lengths.tolist()):
        want = padded(reference(seq_len, block_size), seq_len, n)
        assert torch.equal(dense[row, 0], want)
        assert torch.equal(noisy[row, 0], swap_key_halves(want[:seq_len], seq_len))


def test_noisy_mask_is_the_noisy_rows_in_cache_order():
    for seq_len, block_size in ((9, 4), (12, 3), (5, 8)):
        full = drafter_dense_mask(seq_len, block_size)[0, 0]
        assert torch.equal(drafter_noisy_mask(seq_len, block_size)[0, 0], swap_key_halves(full[:seq_len], seq_len))


def test_causal_in_block_rollout_mask():
    """With no mask token, a block that sees the clean prefix and itself causally is the parent continuing it."""
    seq_len, block_size = 10, 4
    mask = drafter_noisy_mask(seq_len, block_size, causal_in_block=True)[0, 0]
    clean, own = mask[:, :seq_len], mask[:, seq_len:]
    for q in range(seq_len):
        start = q // block_size * block_size
        assert clean[q].nonzero().flatten().tolist() == list(range(start))
        assert own[q].nonzero().flatten().tolist() == list(range(start, q + 1))


def test_sdpa_over_cache_equals_the_whole_layout():
    """Attention of the noisy queries over [clean | noisy] keys equals their rows of the 2L layout."""
    seq_len, block_size = 13, 4
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 2 * seq_len, 8) for _ in range(3))
    lengths = torch.tensor([13, 6])
    whole = F.scaled_dot_product_attention(q, k, v, attn_mask=drafter_dense_mask(seq_len, block_size, lengths))
    order = torch.cat([torch.arange(seq_len, 2 * seq_len), torch.arange(seq_len)])  # cache order of the keys
    split = F.scaled_dot_product_attention(q[:, :, :seq_len], k[:, :, order], v[:, :, order],
                                           attn_mask=drafter_noisy_mask(seq_len, block_size, lengths))
    torch.testing.assert_close(split, whole[:, :, :seq_len], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("noisy_only, causal_in_block", [(False, False), (True, False), (True, True)])
def test_flex_mask_mod_equals_dense(noisy_only, causal_in_block):
    from torch.nn.attention.flex_attention import create_mask

    for seq_len, block_size, lengths in [(7, 3, None), (13, 4, [13, 9, 2]), (12, 16, [5])]:
        lt = None if lengths is None else torch.tensor(lengths)
        bm = drafter_flex_mask(seq_len, block_size, lt, device="cpu", noisy_only=noisy_only,
                               causal_in_block=causal_in_block)
        batch = 1 if lt is None else len(lengths)
        q_len = seq_len if noisy_only else 2 * seq_len
        got = create_mask(bm.mask_mod, batch, 1, q_len, 2 * seq_len, device="cpu")
        if noisy_only:
            want = drafter_noisy_mask(seq_len, block_size, lt, causal_in_block=causal_in_block)
        else:
            want = drafter_dense_mask(seq_len, block_size, lt)
        assert torch.equal(got, want.expand(batch, -1, -1, -1))


def test_flex_block_mask_skips_only_empty_tiles():
    seq_len, block_size = 200, 16
    bm = drafter_flex_mask(seq_len, block_size, device="cpu")
    dense = drafter_dense_mask(seq_len, block_size)[0, 0]
    tile = bm.BLOCK_SIZE[0]
    listed = set()
    for nums, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        for qt in range(nums.shape[2]):
            listed |= {(qt, int(idx[0, 0, qt, j])) for j in range(int(nums[0, 0, qt]))}
    n_tiles = -(-2 * seq_len // tile)
    for qt in range(n_tiles):
        for kt in range(n_tiles):
            if (qt, kt) not in listed:
                assert not dense[qt * tile:(qt + 1) * tile, kt * tile:(kt + 1) * tile].any(), (qt, kt)
    assert len(listed) < n_tiles * n_tiles  # the clean stream never reads the noisy half: tiles are skipped


def test_one_rule_behind_every_drafter_mask():
    idx = torch.arange(2 * 6)
    pos, clean = attention._layout_index(idx, 6, clean_first=False)
    rule = attention._drafter_allowed(pos[:, None], clean[:, None], pos[None, :], clean[None, :], 4)
    assert torch.equal(rule, drafter_dense_mask(6, 4)[0, 0])
