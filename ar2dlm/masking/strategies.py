"""Noise schedules for block-diffusion training: which tokens of a clean batch get replaced by the mask token.

Every sequence is cut into blocks of `block_size` consecutive positions (the last may be partial), and each
(row, block) draws its own noise level, because at decode time each block is denoised on its own from fully masked
to clean: the model must see every noise level in every block, not one level per sequence.

Only `maskable` tokens are ever noised (and scored): the response tokens of chat data, every real token of packed
text, never padding. Two strategies:

* uniform: each maskable token of a block is masked independently with the block's probability t ~ U(eps, 1).
* position: Efficient-DLM's position-dependent masking. A block masks exactly round(m * n) of its n maskable tokens,
  m ~ U(eps, 1), preferring later positions at low noise. A left-to-right-ish decoder unmasks early positions first,
  so at low noise the still-masked tokens tend to be the late ones; training on that shape matches inference.

Complementary masking pairs every mask with its complement over the maskable tokens, so each token is scored exactly
once per pair: the same data gives a lower-variance loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ar2dlm.errors import Ar2dlmError

STRATEGIES = ("uniform", "position")


@dataclass
class MaskingConfig:
    """How training batches are noised.

    `eps` is the lowest noise level (a level of 0 would mask nothing and teach nothing); `half_life` is h in
    position-dependent masking: at the lowest noise the masking weight doubles every h * block_size positions.
    """

    strategy: str = "uniform"
    eps: float = 1e-3
    half_life: float = 0.5
    complementary: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise Ar2dlmError(f"unknown masking strategy {self.strategy!r} (choose {' or '.join(STRATEGIES)})")
        if not 0.0 < self.eps < 1.0:
            raise Ar2dlmError(f"masking eps must be in (0, 1), got {self.eps}")
        if not self.half_life > 0.0:
            raise Ar2dlmError(f"masking half_life must be > 0, got {self.half_life}")


@dataclass
class NoisyBatch:
    """A noised batch: `noisy_ids` is fed to the model, the loss is taken on `masked` positions against `clean_ids`.

    With complementary masking it has 2N rows: the N original masks, then their N complements.
    """

    noisy_ids: torch.Tensor  # long [N', L]
    clean_ids: torch.Tensor  # long [N', L]
    masked: torch.Tensor  # bool [N', L]


def _check(maskable: torch.Tensor, block_size: int) -> None:
    if maskable.dim() != 2 or maskable.dtype != torch.bool:
        raise Ar2dlmError(f"maskable must be a 2-D bool tensor, got {maskable.dtype} of shape {tuple(maskable.shape)}")
    if block_size < 1:
        raise Ar2dlmError(f"block size must be >= 1, got {block_size}")


def _noise_levels(n: int, nblocks: int, eps: float, device: torch.device, generator: torch.Generator | None):
    """One level per (row, block), uniform on (eps, 1)."""
    return eps + (1.0 - eps) * torch.rand(n, nblocks, device=device, generator=generator)


def uniform_mask(
    maskable: torch.Tensor, block_size: int, eps: float = 1e-3, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per (row, block) draw t ~ U(eps, 1); mask each maskable token of the block independently with probability t."""
    _check(maskable, block_size)
    n, length = maskable.shape
    nblocks = -(-length // block_size)
    t = _noise_levels(n, nblocks, eps, maskable.device, generator)
    t_pos = t.repeat_interleave(block_size, dim=1)[:, :length]
    u = torch.rand(n, length, device=maskable.device, generator=generator)
    return (u < t_pos) & maskable


def position_dependent_mask(
    maskable: torch.Tensor,
    block_size: int,
    eps: float = 1e-3,
    half_life: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per (row, block) draw m ~ U(eps, 1) and mask exactly k = round(m * n) of the block's n maskable tokens (>= 1).

    The k are drawn without replacement by Gumbel-top-k with log-weight lambda * (1 - m) * i for in-block position i,
    lambda = ln 2 / (half_life * block_size): late positions are favoured at low noise, the choice is uniform at m = 1.
    """
    _check(maskable, block_size)
    n, length = maskable.shape
    nblocks = -(-length // block_size)
    padded = nblocks * block_size
    device = maskable.device

    ok = torch.zeros(n, padded, dtype=torch.bool, device=device)
    ok[:, :length] = maskable
    ok = ok.view(n, nblocks, block_size)

    m = _noise_levels(n, nblocks, eps, device, generator)
    count = ok.sum(-1)
    k = torch.where(count > 0, torch.round(m * count).clamp(min=1), torch.zeros_like(m)).long()

    lam = math.log(2.0) / (half_life * block_size)
    pos = torch.arange(block_size, device=device, dtype=torch.float32)
    u = torch.rand(n, nblocks, block_size, device=device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float32).tiny)))
    scores = (lam * (1.0 - m))[..., None] * pos + gumbel
    scores = scores.masked_fill(~ok, float("-inf"))  # never chosen: k <= count, and every maskable score is finite

    order = scores.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(block_size, device=device).expand_as(order))
    chosen = rank < k[..., None]
    return chosen.view(n, padded)[:, :length]


def complement_mask(mask: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """The maskable tokens that `mask` left clean."""
    return maskable & ~mask


def sample_mask(
    maskable: torch.Tensor, block_size: int, config: MaskingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw a mask with the strategy named in `config`."""
    if config.strategy == "uniform":
        return uniform_mask(maskable, block_size, eps=config.eps, generator=generator)
    if config.strategy == "position":
        return position_dependent_mask(
            maskable, block_size, eps=config.eps, half_life=config.half_life, generator=generator
        )
    raise Ar2dlmError(f"unknown masking strategy {config.strategy!r}")  # unreachable after MaskingConfig validation


def _ensure_one(masked: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """Mask the last maskable token of any row that drew no mask, so no row adds zero loss by chance."""
    idx = torch.arange(maskable.shape[1], device=maskable.device)
    last = torch.where(maskable, idx, -1).max(dim=1).values
    need = maskable.any(dim=1) & ~masked.any(dim=1)
    return masked | ((idx[None, :] == last[:, None]) & need[:, None])


def noise_batch(
    clean_ids: torch.Tensor,
    maskable: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    config: MaskingConfig,
    generator: torch.Generator | None = None,
) -> NoisyBatch:
    """Noise a batch; with `config.complementary` return 2N rows, [masks; complements], over repeated clean ids.

    The at-least-one-mask guarantee is applied before complementing, so a complement row may be empty (its partner
    masked everything); that is the price of scoring each token exactly once per pair.
    """
    if clean_ids.shape != maskable.shape:
        raise Ar2dlmError(f"clean_ids {tuple(clean_ids.shape)} and maskable {tuple(maskable.shape)} differ in shape")
    masked = _ensure_one(sample_mask(maskable, block_size, config, generator), maskable)
    if config.complementary:
        masked = torch.cat([masked, complement_mask(masked, maskable)])
        clean_ids = torch.cat([clean_ids, clean_ids])
    noisy_ids = torch.where(masked, torch.full_like(clean_ids, mask_token_id), clean_ids)
    return NoisyBatch(noisy_ids=noisy_ids, clean_ids=clean_ids, masked=masked)
