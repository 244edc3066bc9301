"""The per-sequence block state of the cached engine: which positions each forward feeds, which logit predicts
which masked position, what gets committed, and when a finished block's keys/values count as cached.

Blocks are aligned to absolute positions 0, B, 2B, ... (prompt included), as in training, so the first block after
the prompt may be partial. Three regions of the sequence matter at every forward:

* `[0, cached)`: blocks whose K/V sit in the cache, computed from their final tokens with all earlier blocks final;
* `[cached, final_end)`: blocks that are complete but not cached yet (the prompt's full blocks on the first forward,
  the block finished by the previous forward, or blocks held back by `cache_delay`). They are fed again; this forward
  computes their K/V from final tokens, so afterwards they can be marked cached without any extra forward;
* `[final_end, fed_end)`: the open blocks (the first one still has masks), recomputed every forward.

A forward feeds `[cached, fed_end)`, writes those K/V into their own slots and reads everything below `fed_end`
block-causally. With token shift, a block's first position is predicted by the last position of the previous block
seen with its final tokens ("clean"); that logit only exists in the forward that feeds the finished previous block,
so it is kept (`clean_logit`) for the block's later forwards. A later open block (multi-block decoding) whose
predecessor is not final yet has no clean predictor for its first position, which then simply waits.

Only what some used logit depends on is fed. The plan lists the positions whose logits the commit step will read
(`logit_pos`: the clean predictor when it is due, and the predictor of every still-masked position that can commit),
and the fed range ends with the last block holding one of them: open blocks after it cannot influence those logits
(attention is block-causal) and their keys/values are recomputed anyway before anything reads them. So with block
size 1 and token shift (an AR model run by the engine) a forward feeds just the token committed by the previous one,
exactly like an AR decoder; a policy that only ever commits the leftmost masked position (`ar`) feeds no open block
while that position is a block start predicted by the clean logit; and a forward that needs nothing (the one masked
position left is a block start whose clean logit is stored, and no final block is waiting to be cached) feeds
nothing at all. None of this changes a logit that is used, so tokens and NFE stay those of the reference decoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ar2dlm.engine.plan import Plan
from ar2dlm.engine.policies import Policy
from ar2dlm.engine.sampling import Sampling

if TYPE_CHECKING:
    from ar2dlm.engine.params import DecodeParams


class BlockState:
    """The blocks of one sequence being generated: its tokens, which are still masked, which blocks are open, and
    how far its K/V are cached. `params` is the request's DecodeParams (only the multi-block knobs are read)."""

    def __init__(self, prompt_ids: list[int], max_new_tokens: int, block_size: int, mask_id: int,
                 token_shift: bool, params: "DecodeParams", leftmost_only: bool = False):
        self.prompt_len = len(prompt_ids)
        self.limit = self.prompt_len + max_new_tokens
        self.slot_limit = self.limit  # cache slots it may write
        self.block_size, self.mask_id, self.token_shift, self.params = block_size, mask_id, token_shift, params
        self.leftmost_only = leftmost_only  # the policy only ever commits the leftmost candidate (`ar`)
        self.toks = list(prompt_ids) + [mask_id] * max_new_tokens
        # Tracked apart from the token value so a prompt that happens to contain the mask id is never "masked".
        self.pending = [False] * self.prompt_len + [True] * max_new_tokens
        self.next_block = self.prompt_len // block_size  # the next block to open
        self.open: list[int] = []  # opened blocks that still have masked positions, in order
        self.fully_active: set[int] = set()
        self.final_count: dict[int, int] = {}  # block -> forwards that fed it while it was final
        self.clean_logit: dict[int, torch.Tensor] = {}  # block start -> logit predicting it (token shift)
        self.cached = 0
        self.decoded = self.prompt_len  # end of the decoded prefix (first masked position)
        self.nfe = 0
        self._open_next()

    # --------------------------------------------------------------------------------------------- blocks
    def span(self, k: int) -> tuple[int, int]:
        """Generated positions of block k (prompt positions excluded, cut at the length limit)."""
        return max(k * self.block_size, self.prompt_len), min((k + 1) * self.block_size, self.limit)

    def fraction(self, k: int) -> float:
        lo, hi = self.span(k)
        if hi <= lo:  # a block made of prompt only
            return 1.0
        return 1.0 - sum(self.pending[lo:hi]) / (hi - lo)

    def _open_next(self) -> None:
        if self.next_block * self.block_size < self.limit:
            self.open.append(self.next_block)
            self.next_block += 1

    # --------------------------------------------------------------------------------------------- forward
    def plan(self) -> Plan:
        refresh = self.params.refresh_every and self.nfe and self.nfe % self.params.refresh_every == 0
        fed_start = 0 if refresh else self.cached
        final_end = self.open[0] * self.block_size
        need = []
        # The clean predictor of the first open block's first position, when it is due (this forward feeds it).
        due = None
        if (self.token_shift and fed_start < final_end < self.limit and self.pending[final_end]
                and final_end not in self.clean_logit):
            due = final_end
            need.append(final_end - 1)
        for _, m in self._candidates(due):
            if not (self.token_shift and m % self.block_size == 0):  # a block start reads the clean logit
                need.append(m - 1 if self.token_shift else m)
        fed_end = final_end
        if need and need[-1] >= final_end:
            fed_end = min((need[-1] // self.block_size + 1) * self.block_size, self.limit)
        return Plan(fed_start, fed_end, final_end, need)

    def _candidates(self, due: int | None = None):
        """(block, position) of the masked positions that may commit, left to right: every one of an open block
        except a block start with no clean predictor (stored, or `due` from this forward); with `leftmost_only`
        just the first."""
        for k in self.open:
            start, end = self.span(k)
            for m in range(start, end):
                if not self.pending[m]:
                    continue
                if self.token_shift and m % self.block_size == 0 and m != due and m not in self.clean_logit:
                    continue  # predecessor not final yet: nothing predicts m properly, it waits
                yield k, m
                if self.leftmost_only:
                    return

    def apply(self, plan: Plan, logits: torch.Tensor | None, policy: Policy, sampling: Sampling,
              generator: torch.Generator | None) -> tuple[int, int]:
        """Commit from this forward's logits (one row per position of `plan.logit_pos`, in order); returns the
        decoded prefix (old end, new end) so the caller can look for stop tokens/strings in what just became final."""
        self.nfe += 1
        B = self.block_size
        row_of = {p: j for j, p in enumerate(plan.logit_pos)}
        if self.token_shift and plan.final_end - 1 in row_of:
            # the clean predictor of the first open block's first position; kept for its later forwards
            self.clean_logit[plan.final_end] = logits[row_of[plan.final_end - 1]].clone()
        # "Fully active" is decided on the input state: the block's predecessor is (almost) done.
        for i, k in enumerate(self.open):
            if i == 0 or self.fraction(k - 1) >= self.params.activate_ratio:
                self.fully_active.add(k)
        by_block: dict[int, list[int]] = {}
        for k, m in self._candidates():
            by_block.setdefault(k, []).append(m)
        for k, where in by_block.items():
            rows = [self.clean_logit[m] if self.token_shift and m % B == 0 else logits[row_of[m - 1 if self.token_shift else m]]
                    for m in where]
            commit, tokens = policy.step(torch.stack(rows), k in self.fully_active, sampling, generator)
            for m, c, t in zip(where, commit.tolist(), tokens.tolist()):
                if c:
                    self.toks[m], self.pending[m] = t, False
        self.open = [k for k in self.open if self.fraction(k) < 1.0]
        for k in list(self.clean_logit):
            if not self.pending[k]:
                del self.clean_logit[k]

        # Blocks fed while final now have final K/V in their slots; after `cache_delay` such forwards they are cached.
        for b in range(plan.fed_start // B, plan.final_end // B):
            self.final_count[b] = self.final_count.get(b, 0) + 1
        while self.cached < plan.final_end and self.final_count.get(self.cached // B, 0) >= self.params.cache_delay:
            self.cached += B

        # Open the next block: single-block when the current one is done; multi-block as soon as the last opened one
        # is `p_add` decoded (one new block per forward at most, bounded by `max_open_blocks`).
        if not self.open:
            self._open_next()
        elif self.params.block_parallel and len(self.open) < self.params.max_open_blocks \
                and self.fraction(self.next_block - 1) >= self.params.p_add:
            self._open_next()

        old = self.decoded
        while self.decoded < self.limit and not self.pending[self.decoded]:
            self.decoded += 1
        return old, self.decoded

    def release(self) -> None:
        """The sequence is over: drop the stored logits (the only tensors it holds)."""
        self.clean_logit.clear()
