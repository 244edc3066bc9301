"""Sample construction against hand-built trajectories."""

import pytest
import torch

from ar2dlm.distillation.samples import (SampleConfig, block_size_at, build_micro, random_ranks, ratio_floor, rerank,
                                        trajectory_mask)
from ar2dlm.distillation.trajectories import Trajectory
from ar2dlm.errors import Ar2dlmError

MASK, PAD = 99, 0


def _mask(rank_row, ratios_row, B=4):
    return trajectory_mask(torch.tensor([rank_row]), B, torch.tensor([ratios_row], dtype=torch.float64))[0].tolist()


def test_mask_follows_the_teacher_order():
    # block 0: prompt (x2) then positions decoded 2nd and 1st; block 1: decoded in order 3, 0, 2, 1
    rank = [-1, -1, 1, 0, 3, 0, 2, 1]
    # r = 0.5: block 0 has n=2 -> cutoff int(0.5*2)=1 -> rank >= 1 masked; block 1 n=4 -> cutoff 2 -> rank >= 2
    assert _mask(rank, [0.5, 0.5]) == [0, 0, 1, 0, 1, 0, 1, 0]
    # r = 0.8 on block 1: cutoff int(0.2*4)=0 -> everything masked; r = 0.25: cutoff 3 -> only the last decoded
    assert _mask(rank, [0.25, 0.8])[4:] == [1, 1, 1, 1]
    assert _mask(rank, [0.25, 0.25])[4:] == [1, 0, 0, 0]
    # r = 0 would mask nothing: the teacher's last decoded token stays masked
    assert _mask(rank, [0.0, 0.0]) == [0, 0, 1, 0, 1, 0, 0, 0]
    # r = 1: every generated token, never the prompt
    assert _mask(rank, [1.0, 1.0]) == [0, 0, 1, 1, 1, 1, 1, 1]


def test_partial_last_block_and_padding():
    rank = [-1, 0, 1, 2, 0, 1]  # L=6 with B=4: the second block has 2 positions
    assert _mask(rank, [0.5, 0.5]) == [0, 0, 1, 1, 0, 1]


def test_curriculum_floor():
    cfg = SampleConfig(ratio_max=0.8)
    assert ratio_floor(0.0, cfg) == 0.0 and ratio_floor(0.5, cfg) == pytest.approx(0.4)
    assert ratio_floor(1.0, cfg) == pytest.approx(0.8) and ratio_floor(2.0, cfg) == pytest.approx(0.8)
    assert ratio_floor(0.9, SampleConfig(curriculum=False)) == 0.0


def _trajs(n=6, L=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 90, (L,), generator=g).tolist()
        rank = [-1] * 5 + torch.randperm(3, generator=g).tolist()  # prompt of 5, then a partial block of 3
        for _ in range((L - 8) // 4):
            rank += torch.randperm(4, generator=g).tolist()
        out.append(Trajectory(ids, rank))
    return out


def test_micro_batch_masks_only_generated_tokens_and_complements():
    trajs = _trajs()
    g = torch.Generator().manual_seed(1)
    mb = build_micro(trajs, 4, MASK, PAD, SampleConfig(), 0.3, g)
    n = len(trajs)
    assert mb.noisy_ids.shape[0] == 2 * n  # complementary copy
    gen = torch.tensor([t.rank for t in trajs]) >= 0
    first, comp = mb.masked[:n], mb.masked[n:]
    assert not (first & ~gen).any() and torch.equal(first | comp, gen) and not (first & comp).any()
    assert torch.equal(mb.noisy_ids == MASK, mb.masked)
    assert torch.equal(mb.clean_ids[:n], torch.tensor([t.input_ids for t in trajs]))


def test_curriculum_raises_the_mask_ratio():
    trajs = _trajs(n=32, L=64)
    cfg = SampleConfig(complementary=False)
    early = build_micro(trajs, 4, MASK, PAD, cfg, 0.0, torch.Generator().manual_seed(0))
    late = build_micro(trajs, 4, MASK, PAD, cfg, 1.0, torch.Generator().manual_seed(0))
    gen = sum(sum(t.maskable) for t in trajs)
    assert 0.3 < early.n_scored / gen < 0.55  # r ~ U[0, 0.8], at least one per block
    assert late.n_scored / gen > 0.9  # r = 0.8 masks int(0.2*4) = 0 -> all of a full block


def test_random_order_keeps_the_count_but_not_the_positions():
    trajs = _trajs(n=16, L=64)
    rank = torch.tensor([t.rank for t in trajs])
    shuffled = random_ranks(rank, 4, torch.Generator().manual_seed(0))
    assert torch.equal(shuffled >= 0, rank >= 0)
    # each block's ranks are still a permutation of 0..n-1
    assert torch.equal(shuffled.view(16, -1, 4).sort(-1).values[:, 2:], rank.view(16, -1, 4).sort(-1).values[:, 2:])
    assert not torch.equal(shuffled, rank)


def test_invalid_settings():
    with pytest.raises(Ar2dlmError):
        SampleConfig(ratio_max=0)
    with pytest.raises(Ar2dlmError):
        SampleConfig(order="sideways")


def test_rerank_into_larger_and_smaller_blocks():
    # teacher blocks of 4: prompt x2 then ranks; the second block decoded 1, 0, 2, 3; the third 3, 2, 1, 0
    rank = torch.tensor([[-1, -1, 0, 1, 1, 0, 2, 3, 3, 2, 1, 0, 0, -1]])
    # blocks of 8 merge two teacher blocks: the first teacher block's steps come before the second's
    assert rerank(rank, 4, 8)[0].tolist() == [-1, -1, 0, 1, 3, 2, 4, 5, 3, 2, 1, 0, 4, -1]
    # blocks of 2: the relative order inside each half of a teacher block
    assert rerank(rank, 4, 2)[0].tolist() == [-1, -1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0, -1]
    assert torch.equal(rerank(rank, 4, 4), rank)


def test_micro_batch_at_a_grown_block_size():
    trajs = [Trajectory(list(range(10, 22)), [-1, -1, 1, 0, 2, 0, 3, 1, 0, 1, 2, 3])]
    cfg = SampleConfig(ratio_max=0.5, curriculum=False, complementary=False)
    mb = build_micro(trajs, 8, MASK, PAD, cfg, 0.0, torch.Generator().manual_seed(0), teacher_block=4)
    assert mb.block_size == 8
    # teacher steps (block * 4 + rank) of positions 2..7 are 1, 0, 6, 4, 7, 5, so the block of 8 holds 6 generated
    # tokens in order [1, 0, 4, 2, 5, 3]: r <= 0.5 masks the teacher's last ones, never its first; the second block
    # (4 tokens, order 0 1 2 3) masks from its end too
    masked = mb.masked[0].tolist()
    assert masked[:2] == [False, False] and not masked[3]
    assert masked[6] and masked[11]
    first = [r for r, m in zip([1, 0, 4, 2, 5, 3], masked[2:8]) if m]
    assert first and sorted(first) == list(range(6 - len(first), 6))  # exactly the last decoded


def test_block_size_stages():
    assert [block_size_at(f, (4, 8)) for f in (0.0, 0.49, 0.5, 0.99, 1.0)] == [4, 4, 8, 8, 8]
    assert [block_size_at(f, (4, 8, 16)) for f in (0.0, 0.34, 0.67, 1.0)] == [4, 8, 16, 16]
    assert block_size_at(0.7, (4,)) == 4
