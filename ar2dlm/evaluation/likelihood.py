"""Held-out likelihood, on the same tokens: the AR parent's NLL and the dLM's block-diffusion bound on its own.

AR parent: a plain causal forward; the token at p is scored from the logit at p - 1.

dLM: the negative ELBO of block diffusion. Each block is denoised on its own, conditioned on the clean earlier
blocks, so -log p(x) = sum over blocks of -log p(x_b | x_<b), and each term is bounded by the masked-diffusion ELBO.
For a block with n scored tokens:

    -log p(x_b | x_<b) <= E_{k ~ U{1..n}} E_{M: k of the n, uniformly} [(n / k) * sum_{i in M} CE_i(M masked)]

This is the continuous-time bound E_{t ~ U(0,1)} E_{M ~ Bernoulli(t)} [(1/t) sum_{i in M} CE_i] with t integrated out
(the chance of k masks given t, times 1/t, integrates to 1/k). We draw k rather than t because the t form misbehaves
as an estimator: forcing "at least one mask" into a Bernoulli(t) draw biases it (the 1/t weight then integrates to
infinity), and without forcing, one mask at small t carries weight 1/t, so the variance is infinite. With k every draw
masks at least one token, the estimate is unbiased and its variance finite. The `samples` draws of one sequence are
stratified: in every block, the S draws of k come from the S equal slices of U(0,1), in a random order.

One forward scores all blocks of a sequence at once (the [noisy | clean] training layout): a noisy block sees only
itself and the clean earlier blocks, so each block's term does not depend on the other blocks' masks.

Which tokens are scored: the maskable ones (every token of packed text; the response of chat/instruction records)
except position 0 of each sequence, which nothing predicts under token shift and the AR parent cannot score either.
So both numbers are over the same tokens, -log p(x_1.. | x_0) per sequence. Unscored tokens of a block (position 0, a
chat prompt) stay clean: they are conditioned on. A sequence ending inside a block is filled with mask tokens to the
block's end (unscored, always masked), which is what the decoder sees: it never knows where the text will stop.

The bound's draws are stratified (see `draw_masks`), so the standard error that `ar2dlm ppl` reports, treating a
sequence's draws as independent, overstates the error a little.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ar2dlm.errors import Ar2dlmError


def check_fixed_t(t: float | None) -> None:
    if t is not None and not 0.0 < t <= 1.0:
        raise Ar2dlmError(f"fixed t must be in (0, 1], got {t}")


# --------------------------------------------------------------------------------------------------- batches
@dataclass
class ScoredBatch:
    """Sequences to score, right-padded: tokens, then mask tokens to the end of the last block, then padding."""

    ids: torch.Tensor  # long [N, W]
    scored: torch.Tensor  # bool [N, W]: the tokens whose NLL counts
    tokens: torch.Tensor  # long [N]: real tokens per row
    lengths: torch.Tensor  # long [N]: real tokens + the mask fill (what the dLM attends to)

    def to(self, device) -> ScoredBatch:
        return ScoredBatch(self.ids.to(device), self.scored.to(device), self.tokens.to(device),
                           self.lengths.to(device))


def make_batch(rows: Sequence[tuple[Sequence[int], Sequence[bool]]], block_size: int, mask_id: int, pad_id: int,
               context: int | None = None) -> ScoredBatch:
    """rows: (token ids, maskable flags). Position 0 is never scored (see the module docstring)."""
    if not rows:
        raise Ar2dlmError("nothing to score")
    ns = [len(ids) for ids, _ in rows]
    if min(ns) < 2:
        raise Ar2dlmError("a sequence needs at least 2 tokens (the first one is only conditioned on)")
    fills = [-(-n // block_size) * block_size for n in ns]
    if context is not None:
        fills = [min(f, max(context, n)) for f, n in zip(fills, ns)]
    width = max(fills)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, ((toks, maskable), n, f) in enumerate(zip(rows, ns, fills)):
        if len(maskable) != n:
            raise Ar2dlmError(f"row {i}: {n} tokens but {len(maskable)} maskable flags")
        ids[i, :n] = torch.tensor(list(toks), dtype=torch.long)
        ids[i, n:f] = mask_id
        scored[i, :n] = torch.tensor(list(maskable), dtype=torch.bool)
    scored[:, 0] = False
    return ScoredBatch(ids, scored, torch.tensor(ns), torch.tensor(fills))


def row_seed(key: Sequence[int]) -> int:
    """A 63-bit seed from a tuple of non-negative ints (e.g. (seed, sequence index)), well mixed by SeedSequence."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)


def draw_masks(scored: torch.Tensor, block_size: int, samples: int, seeds: Sequence[int],
               fixed_t: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks and per-position weights ([S, N, W] bool, [S, N, W] float64) for `samples` draws of the bound.

    In each block with n scored tokens: k in {1..n} (stratified over the S draws, or ceil(fixed_t * n)), then k of
    the n chosen uniformly; every chosen position carries the weight n / k. Row i draws from its own generator
    seeded with seeds[i], so a row's masks do not depend on which rows share its batch.
    """
    check_fixed_t(fixed_t)
    scored = scored.cpu()
    n_rows, width = scored.shape
    nblocks = -(-width // block_size)
    masks = torch.zeros(samples, n_rows, nblocks * block_size, dtype=torch.bool)
    weights = torch.zeros(samples, n_rows, nblocks * block_size, dtype=torch.float64)
    idx = torch.arange(width)
    for r in range(n_rows):
        # draw over the row's own blocks (up to its last scored token), so that padding does not shift the stream
        used = int(torch.where(scored[r], idx + 1, 0).max())
        nb = -(-used // block_size)
        if nb == 0:
            continue
        ok = torch.zeros(nb * block_size, dtype=torch.bool)
        ok[:used] = scored[r, :used]
        ok = ok.view(nb, block_size)
        g = torch.Generator().manual_seed(seeds[r])
        n = ok.sum(-1).expand(samples, nb)
        if fixed_t is None:
            # argsort of iid uniforms is a uniform random permutation: which draw gets which slice of U(0,1)
            strata = torch.rand(samples, nb, generator=g).argsort(dim=0)
            u = (strata + torch.rand(samples, nb, generator=g)) / samples
            k = torch.floor(u * n).long() + 1
        else:
            k = torch.ceil(fixed_t * n).long()
        k = torch.minimum(k.clamp(min=1), n)  # blocks with nothing scored have n = 0 -> k = 0
        score = torch.rand(samples, nb, block_size, generator=g).masked_fill(~ok, -1.0)
        rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)
        chosen = rank < k[..., None]  # only scored positions: k <= n and unscored ones rank last
        w = (n / k.clamp(min=1)).double()[..., None].expand_as(chosen)
        masks[:, r, :nb * block_size] = chosen.reshape(samples, -1)
        weights[:, r, :nb * block_size] = torch.where(chosen, w, torch.zeros_like(w)).reshape(samples, -1)
    return masks[..., :width], weights[..., :width]


# --------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def masked_ce(dlm, batch: ScoredBatch, masked: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [N, W] (float32) of the dLM at the `masked` positions with exactly those masked, 0 elsewhere.

    The mask fill past each row's real tokens is masked too (it always is)."""
    dev = dlm.device
    ids, masked = batch.ids.to(dev), masked.to(dev)
    noisy = torch.where(masked, torch.full_like(ids, dlm.config.mask_token_id), ids)
    logits, targets = dlm.diffusion_logits(noisy, ids, masked, batch.lengths.to(dev))
    out = torch.zeros(masked.shape, dtype=torch.float32, device=dev)
    out[masked] = F.cross_entropy(logits.float(), targets, reduction="none")
    return out


@torch.no_grad()
def diffusion_nll(dlm, batch: ScoredBatch, samples: int, seeds: Sequence[int],
                  fixed_t: float | None = None) -> torch.Tensor:
    """Per-draw estimates of each row's negative ELBO, summed over its scored tokens: float64 [S, N] on the CPU."""
    masks, weights = draw_masks(batch.scored, dlm.config.block_size, samples, seeds, fixed_t)
    out = torch.zeros(samples, batch.ids.shape[0], dtype=torch.float64)
    for s in range(samples):
        ce = masked_ce(dlm, batch, masks[s]).cpu().double()
        out[s] = (ce * weights[s]).sum(1)
    return out


@torch.no_grad()
def greedy_match(dlm, batch: ScoredBatch) -> torch.Tensor:
    """bool [N]: would left-to-right greedy decoding (the engine's `ar` policy) produce every scored token?

    For in-block offset j: the scored tokens at offsets >= j are masked (and the mask fill), earlier ones are
    clean; the argmax at offset j must be the token. By induction this is the same as decoding from the context.
    """
    bsz = dlm.config.block_size
    offset = torch.arange(batch.ids.shape[1]) % bsz
    scored = batch.scored.cpu()
    ok = torch.ones(batch.ids.shape[0], dtype=torch.bool)
    dev = dlm.device
    ids, lengths = batch.ids.to(dev), batch.lengths.to(dev)
    for j in range(bsz):
        here = scored & (offset == j)
        if not here.any():
            continue
        masked = (scored & (offset >= j)).to(dev)
        noisy = torch.where(masked, torch.full_like(ids, dlm.config.mask_token_id), ids)
        logits, targets = dlm.diffusion_logits(noisy, ids, here.to(dev), lengths)
        miss = torch.zeros_like(here)
        miss[here] = (logits.argmax(-1) != targets).cpu()
        ok &= ~miss.any(1)
    return ok


@torch.no_grad()
def ar_nll(parent, batch: ScoredBatch) -> torch.Tensor:
    """NLL of each row's scored tokens under a Hugging Face causal LM, summed: float64 [N] on the CPU.

    Only the predicting positions go through the LM head (the full [N, W, V] logits would dominate memory)."""
    dev = next(parent.parameters()).device
    width = batch.ids.shape[1]
    real = torch.arange(width)[None] < batch.tokens[:, None]
    ids = torch.where(real, batch.ids, torch.zeros_like(batch.ids)).to(dev)  # no mask fill: the parent lacks it
    hidden = parent.get_decoder()(input_ids=ids, attention_mask=real.long().to(dev), use_cache=False)
    hidden = hidden.last_hidden_state
    target = batch.scored[:, 1:].to(dev)
    logits = parent.get_output_embeddings()(hidden[:, :-1][target]).float()
    nll = torch.zeros(target.shape, dtype=torch.float32, device=dev)
    nll[target] = F.cross_entropy(logits, ids[:, 1:][target], reduction="none")
    return nll.double().sum(1).cpu()
