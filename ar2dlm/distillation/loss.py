"""The distillation objective (d3LLM): masked-token cross-entropy plus an entropy term that sharpens the predictions
the model already gets right, so that more of them clear a decoding threshold in the same forward.

entropy term = sum over masked positions whose argmax is the target of H(softmax(logits / T)), T = 0.5 by default;
loss = CE + weight * entropy term. Both are sums; the trainer divides by the scored tokens of the global batch.
The complementary copy (see samples.py) arrives as extra rows of the same batch, so "CE on the complementary mask"
is part of the same sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM


def sharpened_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature), per row.

    The ruled-out mask token carries the dtype's lowest logit; divided by a temperature < 1 it would overflow to -inf
    and turn 0 * log 0 into NaN, so scaled logits are floored at -1e4 (probability exactly 0 either way)."""
    logp = (logits.float() / temperature).clamp(min=-1e4).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


class DistillObjective(nn.Module):
    stat_names = ("loss", "masked_acc", "ce", "entropy")

    def __init__(self, dlm: BlockDiffusionLM, entropy_weight: float = 1.0, entropy_temperature: float = 0.5):
        super().__init__()
        if entropy_weight < 0 or entropy_temperature <= 0:
            raise Ar2dlmError("entropy weight must be >= 0 and entropy temperature > 0")
        self.dlm = dlm
        self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature

    def forward(self, noisy_ids, clean_ids, scored, lengths=None, block_size=None):
        logits, targets = self.dlm.diffusion_logits(noisy_ids, clean_ids, scored, lengths, block_size)
        ce = F.cross_entropy(logits.float(), targets, reduction="sum")
        right = logits.argmax(-1) == targets
        if self.entropy_weight and right.any():
            ent = sharpened_entropy(logits[right], self.entropy_temperature).sum()
        else:
            ent = logits.new_zeros((), dtype=torch.float32)
        return ce + self.entropy_weight * ent, right.sum(), ce, ent
