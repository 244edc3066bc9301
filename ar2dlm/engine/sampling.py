"""How a token is drawn from logits: greedy (argmax) or sampled with temperature / top-k / top-p.

Shared by the commit policies (policies.py, whose `propose` draws one candidate per masked position) and the
lossless `verify` policy (verify.py, whose speculative sampling compares the drafter's and the verifier's filtered
distributions), so that neither imports the other for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ar2dlm.errors import Ar2dlmError


@dataclass(frozen=True)
class Sampling:
    """How a candidate token is chosen: temperature 0 is greedy (argmax); top_k 0 and top_p 1 disable the filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise Ar2dlmError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise Ar2dlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise Ar2dlmError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def filtered_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    scaled = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth = scaled.topk(sampling.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p (so the top token always stays)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
