"""Training samples from trajectories: which tokens are masked, following the teacher's decoding order.

d3LLM builds a sample from one block: earlier blocks clean, later blocks masked, and inside the block, for a mask
ratio r, the tokens the teacher had not yet decoded at step int((1 - r) * n) are masked (n = the block's generated
positions). Our [noisy | clean] layout conditions every noisy block on the clean copies of the earlier blocks only,
so each block of a sequence *is* such a sample (later blocks never influence it): we train all blocks of a sequence
at once, each with its own r, which is d3LLM's sample many times over for the price of one forward.

Curriculum: r ~ U[floor, r_max] with the floor rising linearly from 0 to r_max over training (`fraction` in [0, 1]),
so the model first learns to finish nearly decoded blocks and ends up filling blocks that are mostly masked. Without
the curriculum r ~ U[0, r_max] throughout.

`order="random"` is the ablation: the same number of masked positions per block, but chosen uniformly at random
instead of by the teacher's order.

Block-size curriculum: the student's block can differ from (typically grow past) the teacher's. The teacher decodes
its blocks left to right, so (teacher block index, rank inside it) is a global decoding order, and restricted to any
student block it is the order in which the teacher decided that block's tokens (`rerank`).

Complementary masking: every sequence is also trained with the complement of its mask inside the generated
positions (the tokens the first copy showed become the targets), so every generated token gets a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ar2dlm.data.batching import collate
from ar2dlm.errors import Ar2dlmError
from ar2dlm.training.trainer import MaskedBatch


@dataclass(frozen=True)
class SampleConfig:
    ratio_max: float = 0.8
    curriculum: bool = True
    order: str = "trajectory"  # trajectory | random
    complementary: bool = True

    def __post_init__(self):
        if not 0 < self.ratio_max <= 1:
            raise Ar2dlmError(f"ratio_max must be in (0, 1], got {self.ratio_max}")
        if self.order not in ("trajectory", "random"):
            raise Ar2dlmError(f"unknown sample order {self.order!r} (choose trajectory or random)")


def ratio_floor(fraction: float, cfg: SampleConfig) -> float:
    return cfg.ratio_max * min(1.0, max(0.0, fraction)) if cfg.curriculum else 0.0


def trajectory_mask(rank: torch.Tensor, block_size: int, ratios: torch.Tensor) -> torch.Tensor:
    """Masked positions (bool [N, L]) for per-block mask ratios `ratios` [N, ceil(L / B)].

    In each block with n generated positions (rank >= 0), those with rank >= int((1 - r) * n) are masked; at least
    one (the teacher's last) is always masked, so every block with generated tokens teaches something.
    """
    n_rows, seq_len = rank.shape
    pad = (-seq_len) % block_size
    r = torch.nn.functional.pad(rank, (0, pad), value=-1).view(n_rows, -1, block_size)
    generated = r >= 0
    n_gen = generated.sum(-1)
    cutoff = ((1.0 - ratios.double()) * n_gen.double()).floor().long()
    cutoff = torch.minimum(cutoff, (n_gen - 1).clamp(min=0))  # never "nothing masked"
    masked = generated & (r >= cutoff[..., None])
    return masked.view(n_rows, -1)[:, :seq_len]


def random_ranks(rank: torch.Tensor, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """Ranks replaced by a random order inside each block (same generated positions): the ablation baseline."""
    n_rows, seq_len = rank.shape
    pad = (-seq_len) % block_size
    r = torch.nn.functional.pad(rank, (0, pad), value=-1).view(n_rows, -1, block_size)
    keys = torch.rand(r.shape, generator=generator).masked_fill(r < 0, float("inf"))
    order = keys.argsort(-1).argsort(-1)  # rank of each position among its block's random keys
    out = torch.where(r >= 0, order, torch.full_like(r, -1))
    return out.view(n_rows, -1)[:, :seq_len]


def rerank(rank: torch.Tensor, teacher_block: int, block_size: int) -> torch.Tensor:
    """Ranks recorded in `teacher_block`-sized blocks, re-expressed inside `block_size`-sized blocks.

    A generated position's global step is (teacher block index, rank); inside each new block its new rank is the
    number of the block's generated positions with an earlier global step. Prompt positions stay -1."""
    if teacher_block == block_size:
        return rank
    n_rows, seq_len = rank.shape
    pos = torch.arange(seq_len)
    step = (pos // teacher_block * teacher_block)[None, :] + rank  # rank < teacher_block: no ties across blocks
    pad = (-seq_len) % block_size
    key = torch.nn.functional.pad(torch.where(rank >= 0, step, torch.full_like(step, -1)), (0, pad), value=-1)
    key = key.view(n_rows, -1, block_size)
    big = seq_len + teacher_block  # prompt / padding positions sort last and keep -1
    order = key.masked_fill(key < 0, big).argsort(dim=-1, stable=True).argsort(dim=-1)
    out = torch.where(key >= 0, order, torch.full_like(order, -1))
    return out.view(n_rows, -1)[:, :seq_len]


def block_size_at(fraction: float, sizes: tuple[int, ...]) -> int:
    """The block size of the curriculum stage at training progress `fraction` (equal stages, in order)."""
    return sizes[min(len(sizes) - 1, int(max(0.0, fraction) * len(sizes)))]


def build_micro(trajectories, block_size: int, mask_id: int, pad_id: int, cfg: SampleConfig, fraction: float,
                generator: torch.Generator, teacher_block: int | None = None) -> MaskedBatch:
    """Noised micro-batch from trajectories at training progress `fraction` (drives the curriculum), masked for
    student blocks of `block_size` (trajectories recorded at `teacher_block`, default the same)."""
    batch = collate(trajectories, pad_id, pad_to_multiple=1)
    rank = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
    for i, t in enumerate(trajectories):
        rank[i, :len(t)] = torch.tensor(t.rank, dtype=torch.long)
    rank = rerank(rank, teacher_block or block_size, block_size)
    if cfg.order == "random":
        rank = random_ranks(rank, block_size, generator)
    n_blocks = -(-rank.shape[1] // block_size)
    lo = ratio_floor(fraction, cfg)
    ratios = lo + (cfg.ratio_max - lo) * torch.rand(rank.shape[0], n_blocks, generator=generator, dtype=torch.float64)
    masked = trajectory_mask(rank, block_size, ratios)
    clean = batch.input_ids
    lengths = batch.lengths
    if cfg.complementary:
        masked = torch.cat([masked, (rank >= 0) & ~masked])
        clean = clean.repeat(2, 1)
        lengths = lengths.repeat(2)
    noisy = torch.where(masked, mask_id, clean)
    return MaskedBatch(noisy, clean, masked, lengths, block_size=block_size)
