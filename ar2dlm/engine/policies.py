"""Commit policies: given the logits of a block's still-masked positions, which ones to commit and with which tokens.

Every policy has the same two-stage interface. `propose` turns logits into one candidate token per position with its
confidence (the probability of that token) and the predictive entropy; greedy by default, or sampled with
temperature / top-k / top-p from a seeded generator (the confidence is then the probability of the sampled token
under the distribution it was drawn from). `select` decides which candidates are committed.

`must_commit` says whether the block has to make progress this forward. It is True for the single active block and
for a "fully active" block of multi-block decoding; a block that is only pre-decoding (its predecessor still far
from done) passes False and commits only what clears the bar, possibly nothing.

Positions are always passed left to right, so "leftmost" is index 0 and ties go to the leftmost position, as in the
reference decoder (torch's argmax returns the first maximum).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ar2dlm.engine.sampling import GREEDY, Sampling, filtered_probs
from ar2dlm.engine.verify import VerifyPolicy
from ar2dlm.errors import Ar2dlmError

POLICIES = ("threshold", "entropy", "steps", "ar", "verify")
DEFAULT_TAU = {"threshold": 0.9, "entropy": 0.5}


@dataclass
class Proposal:
    tokens: torch.Tensor  # [N] candidate token per position
    confidence: torch.Tensor  # [N] probability of that token
    entropy: torch.Tensor | None  # [N] entropy (nats) of the distribution it was taken from (None: not computed)


def propose(logits: torch.Tensor, sampling: Sampling = GREEDY, generator: torch.Generator | None = None,
            entropy: bool = True) -> Proposal:
    """Candidate tokens for logits [N, V]. Greedy computes exactly what the reference decoder does (float softmax).
    `entropy` False skips the entropy (a pass over the vocabulary that only the entropy policy reads)."""
    if sampling.greedy:
        probs = logits.float().softmax(-1)
        conf, tok = probs.max(-1)
    else:
        probs = filtered_probs(logits, sampling)
        tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
        conf = probs.gather(-1, tok[:, None])[:, 0]
    return Proposal(tok, conf, torch.special.entr(probs).sum(-1) if entropy else None)


class Policy(ABC):
    name: str
    needs_entropy = False  # select() reads Proposal.entropy
    # select() only ever commits the first candidate it is given: the engine then passes just that one, and need not
    # compute logits for (or feed) the positions behind it
    leftmost_only = False

    def step(
        self,
        logits: torch.Tensor,
        must_commit: bool = True,
        sampling: Sampling = GREEDY,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the masked positions' logits [N, V]: (commit [N] bool, tokens [N])."""
        prop = propose(logits, sampling, generator, entropy=self.needs_entropy)
        return self.select(prop, must_commit), prop.tokens

    @abstractmethod
    def select(self, prop: Proposal, must_commit: bool) -> torch.Tensor:
        """Which candidates to commit (bool [N])."""


def _only(n: int, index, device) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool, device=device)
    out[index] = True
    return out


class ArPolicy(Policy):
    """The leftmost masked position only: the autoregressive baseline inside the same loop (one token a forward)."""

    name = "ar"
    leftmost_only = True

    def select(self, prop: Proposal, must_commit: bool) -> torch.Tensor:
        n = prop.tokens.shape[0]
        if not must_commit or n == 0:
            return torch.zeros(n, dtype=torch.bool, device=prop.tokens.device)
        return _only(n, 0, prop.tokens.device)


class ThresholdPolicy(Policy):
    """Fast-dLLM: every position whose confidence is > tau; if none (and progress is due), the most confident one."""

    name = "threshold"

    def __init__(self, tau: float = DEFAULT_TAU["threshold"]):
        if not 0.0 <= tau <= 1.0:
            raise Ar2dlmError(f"threshold tau must be in [0, 1], got {tau}")
        self.tau = tau

    def select(self, prop: Proposal, must_commit: bool) -> torch.Tensor:
        commit = prop.confidence > self.tau
        if must_commit and prop.confidence.numel() and not commit.any():
            commit = _only(commit.shape[0], prop.confidence.argmax(), commit.device)
        return commit


class EntropyPolicy(Policy):
    """d3LLM: every position whose predictive entropy is < tau (nats); if none, the lowest-entropy one."""

    name = "entropy"
    needs_entropy = True

    def __init__(self, tau: float = DEFAULT_TAU["entropy"]):
        if not (tau >= 0 and math.isfinite(tau)):
            raise Ar2dlmError(f"entropy tau must be a finite number >= 0 (nats), got {tau}")
        self.tau = tau

    def select(self, prop: Proposal, must_commit: bool) -> torch.Tensor:
        commit = prop.entropy < self.tau
        if must_commit and prop.entropy.numel() and not commit.any():
            commit = _only(commit.shape[0], prop.entropy.argmin(), commit.device)
        return commit


class StepsPolicy(Policy):
    """LLaDA-style fixed schedule: the k most confident positions each forward (all of them when fewer remain).

    A block that is only pre-decoding (must_commit False) waits: a fixed budget has no notion of "confident enough".
    """

    name = "steps"

    def __init__(self, k: int = 2):
        if k < 1:
            raise Ar2dlmError(f"steps policy needs k >= 1 tokens per forward, got {k}")
        self.k = k

    def select(self, prop: Proposal, must_commit: bool) -> torch.Tensor:
        n = prop.confidence.shape[0]
        if not must_commit or n == 0:
            return torch.zeros(n, dtype=torch.bool, device=prop.confidence.device)
        # stable descending sort: equal confidences go to the leftmost positions
        order = torch.sort(prop.confidence, descending=True, stable=True).indices[: self.k]
        return _only(n, order, prop.confidence.device)


def make_policy(name: str, tau: float | None = None, k: int = 2):
    """Build a policy by name; `tau` defaults per policy (threshold 0.9, entropy 0.5 nats); `k` is for `steps`."""
    if name == "threshold":
        return ThresholdPolicy(DEFAULT_TAU[name] if tau is None else tau)
    if name == "entropy":
        return EntropyPolicy(DEFAULT_TAU[name] if tau is None else tau)
    if name == "steps":
        return StepsPolicy(k)
    if name == "ar":
        return ArPolicy()
    if name == "verify":  # draft-and-verify has its own sequence state (verify.py), not a select() rule
        return VerifyPolicy()
    raise Ar2dlmError(f"unknown decoding policy {name!r} (choose from {', '.join(POLICIES)})")
