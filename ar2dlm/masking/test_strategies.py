"""Tests for the masking strategies: invariants exactly, distributions statistically (fixed seeds, wide margins)."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.masking import (
    MaskingConfig,
    complement_mask,
    noise_batch,
    position_dependent_mask,
    sample_mask,
    uniform_mask,
)

MASK_ID = 999


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chat_like(n: int = 64, length: int = 29, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with a prompt (not maskable), a response (maskable) and right padding (not maskable); L not a multiple
    of the block sizes used, so the last block is partial."""
    g = gen(seed)
    ids = torch.randint(0, 500, (n, length), generator=g)
    prompt = torch.randint(0, length // 2, (n, 1), generator=g)
    end = torch.randint(length // 2, length + 1, (n, 1), generator=g)
    pos = torch.arange(length)[None, :]
    maskable = (pos >= prompt) & (pos < end)
    maskable[0] = False  # a row with nothing to score
    return ids, maskable


@pytest.mark.parametrize("strategy", ["uniform", "position"])
@pytest.mark.parametrize("block_size", [1, 4, 8, 64])
def test_shape_dtype_and_only_maskable(strategy, block_size):
    _, maskable = chat_like()
    for seed in range(5):
        m = sample_mask(maskable, block_size, MaskingConfig(strategy=strategy), generator=gen(seed))
        assert m.shape == maskable.shape and m.dtype == torch.bool
        assert not (m & ~maskable).any()
        assert not m[0].any()


@pytest.mark.parametrize("strategy", ["uniform", "position"])
@pytest.mark.parametrize("complementary", [False, True])
def test_noise_batch_ids_and_at_least_one(strategy, complementary):
    ids, maskable = chat_like(n=256)
    cfg = MaskingConfig(strategy=strategy, eps=0.01, complementary=complementary)
    b = noise_batch(ids, maskable, 4, MASK_ID, cfg, generator=gen())
    rows = 2 * ids.shape[0] if complementary else ids.shape[0]
    for t in (b.noisy_ids, b.clean_ids, b.masked):
        assert t.shape == (rows, ids.shape[1])
    assert b.noisy_ids.dtype == torch.long and b.clean_ids.dtype == torch.long and b.masked.dtype == torch.bool
    assert torch.equal(b.noisy_ids == MASK_ID, b.masked)  # the clean ids never contain MASK_ID (< 500)
    assert torch.equal(b.noisy_ids[~b.masked], b.clean_ids[~b.masked])
    n = ids.shape[0]
    assert torch.equal(b.clean_ids[:n], ids)
    first = b.masked[:n]
    assert not (first & ~maskable).any()
    assert torch.equal(first.any(1), maskable.any(1))  # every row with something to score scores something


def test_at_least_one_masks_last_maskable_position():
    maskable = torch.zeros(3, 10, dtype=torch.bool)
    maskable[0, 2:7] = True
    maskable[1, 4] = True
    ids = torch.arange(30).view(3, 10)
    # eps tiny and one huge block: masks drawn at noise ~0 often select nothing, forcing the fallback.
    cfg = MaskingConfig(eps=1e-6)
    forced = 0
    for seed in range(50):
        b = noise_batch(ids, maskable, 10, MASK_ID, cfg, generator=gen(seed))
        drawn = uniform_mask(maskable, 10, eps=1e-6, generator=gen(seed))
        assert b.masked[1, 4] and b.masked[1].sum() == 1 and not b.masked[2].any()
        if not drawn[0].any():
            forced += 1
            assert b.masked[0].nonzero().flatten().tolist() == [6]
        else:
            assert torch.equal(b.masked[0], drawn[0])
    assert forced > 0


def test_uniform_mean_ratio():
    eps = 0.2
    m = uniform_mask(torch.ones(4096, 64, dtype=torch.bool), 8, eps=eps, generator=gen())
    assert abs(m.float().mean().item() - (1 + eps) / 2) < 0.01


@pytest.mark.parametrize("strategy", ["uniform", "position"])
def test_noise_level_is_shared_within_a_block_and_independent_across_blocks(strategy):
    m = sample_mask(torch.ones(4096, 64, dtype=torch.bool), 32, MaskingConfig(strategy=strategy), generator=gen())
    frac = m.float().view(4096, 2, 32).mean(-1)
    # One level per block: fractions spread like U(0,1) (var ~1/12), not like a binomial mean (var ~0.008).
    assert frac.var().item() > 0.05
    # A fresh level per block, not per row: the two blocks of a row are uncorrelated.
    assert abs(torch.corrcoef(frac.T)[0, 1].item()) < 0.1


def test_position_rate_increases_within_block():
    m = position_dependent_mask(torch.ones(4096, 64, dtype=torch.bool), 8, half_life=0.5, generator=gen())
    rate = m.view(-1, 8).float().mean(0)
    assert (rate[1:] - rate[:-1] > -0.01).all(), rate
    assert rate[-1] - rate[0] > 0.1, rate


def test_position_half_life_controls_skew():
    mk = torch.ones(2048, 64, dtype=torch.bool)
    flat = position_dependent_mask(mk, 8, half_life=1e6, generator=gen()).view(-1, 8).float().mean(0)
    assert (flat.max() - flat.min()).item() < 0.03, flat
    # A tiny half-life makes the lateness weight dominate: masked tokens are (almost always) a suffix of the block.
    steep = position_dependent_mask(mk, 8, half_life=1e-4, generator=gen()).view(-1, 8)
    k = steep.sum(-1, keepdim=True)
    suffix = torch.arange(8)[None, :] >= 8 - k
    assert (steep == suffix).all(-1).float().mean().item() > 0.95


def test_position_skew_fades_as_noise_rises():
    """The lateness weight is scaled by (1 - m): strong when few tokens are masked, ~uniform when nearly all are."""
    m = position_dependent_mask(torch.ones(4096, 64, dtype=torch.bool), 8, half_life=0.5, generator=gen()).view(-1, 8)
    k = m.sum(-1)
    low = m[k == 1].float().mean(0)  # m < 3/16: the single masked token leans late (~3x last vs first)
    assert low[-1] > 2 * low[0], low
    left = (~m[k == 7]).float().mean(0)  # m ~ 7/8: the single clean token is nearly uniform over positions
    assert left[0] < 1.5 * left[-1], left


def test_position_count_is_round_m_n():
    """With n = 8 fully maskable positions, k = max(1, round(8m)), m ~ U(eps, 1):
    P(k=1) = 3/16, P(k=2..7) = 2/16 each, P(k=8) = 1/16; mean ratio 65/128 ~ 0.508."""
    m = position_dependent_mask(torch.ones(4096, 64, dtype=torch.bool), 8, generator=gen())
    k = m.view(-1, 8).sum(-1)
    hist = torch.bincount(k, minlength=9).float() / k.numel()
    expected = torch.tensor([0, 3, 2, 2, 2, 2, 2, 2, 1]) / 16
    assert (hist - expected).abs().max().item() < 0.015, hist
    assert abs(m.float().mean().item() - 0.5) < 0.02


def test_position_partial_blocks_and_prompts():
    """Counts follow round(m * n) with n the maskable positions of each block, including a partial last block."""
    ids, maskable = chat_like(n=512, length=29)
    bs = 8
    for seed in range(4):
        m = position_dependent_mask(maskable, bs, generator=gen(seed))
        assert not (m & ~maskable).any()
        pad = torch.zeros(512, 32, dtype=torch.bool)
        pm, pk = pad.clone(), pad.clone()
        pm[:, :29], pk[:, :29] = m, maskable
        k, n = pm.view(512, 4, bs).sum(-1), pk.view(512, 4, bs).sum(-1)
        assert ((k >= 1) == (n >= 1)).all() and (k <= n).all()
    # A block with a single maskable token always masks it.
    one = torch.zeros(16, 11, dtype=torch.bool)
    one[:, 9] = True
    assert torch.equal(position_dependent_mask(one, 4, generator=gen()), one)


def test_complementary_pairs_are_disjoint_and_cover_maskable():
    ids, maskable = chat_like(n=128)
    for strategy in ("uniform", "position"):
        cfg = MaskingConfig(strategy=strategy, complementary=True)
        b = noise_batch(ids, maskable, 4, MASK_ID, cfg, generator=gen())
        a, c = b.masked[:128], b.masked[128:]
        assert not (a & c).any()
        assert torch.equal(a | c, maskable)
        assert torch.equal(b.clean_ids[128:], ids)
        assert torch.equal(c, complement_mask(a, maskable))


@pytest.mark.parametrize("strategy", ["uniform", "position"])
def test_generator_reproducible(strategy):
    ids, maskable = chat_like()
    cfg = MaskingConfig(strategy=strategy, complementary=True)
    a = noise_batch(ids, maskable, 4, MASK_ID, cfg, generator=gen(7))
    b = noise_batch(ids, maskable, 4, MASK_ID, cfg, generator=gen(7))
    c = noise_batch(ids, maskable, 4, MASK_ID, cfg, generator=gen(8))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.noisy_ids, b.noisy_ids)
    assert not torch.equal(a.masked, c.masked)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "random"}, "unknown masking strategy"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 1.0}, "eps"),
        ({"half_life": 0.0}, "half_life"),
        ({"half_life": -1.0}, "half_life"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(Ar2dlmError, match=match):
        MaskingConfig(**kwargs)


def test_bad_inputs():
    with pytest.raises(Ar2dlmError, match="bool"):
        uniform_mask(torch.ones(2, 4, dtype=torch.long), 2)
    with pytest.raises(Ar2dlmError, match="block size"):
        position_dependent_mask(torch.ones(2, 4, dtype=torch.bool), 0)
