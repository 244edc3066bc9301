"""The conversion objective: cross-entropy of the dLM at masked positions (sums; the trainer normalises)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ar2dlm.model.dlm import BlockDiffusionLM


class DiffusionObjective(nn.Module):
    """Summed masked-token cross-entropy as a module, so DDP/FSDP can wrap the whole training forward.

    Returns sums, not means: the trainer divides by the number of masked tokens in the *global* batch (all
    micro-batches, all ranks), which makes the loss an exact per-token average however the batch is split.
    """

    def __init__(self, dlm: BlockDiffusionLM):
        super().__init__()
        self.dlm = dlm

    def forward(self, noisy_ids, clean_ids, scored, lengths=None, block_size=None):
        logits, targets = self.dlm.diffusion_logits(noisy_ids, clean_ids, scored, lengths, block_size)
        ce_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = (logits.argmax(-1) == targets).sum()
        return ce_sum, correct


def scorable(maskable: torch.Tensor, token_shift: bool) -> torch.Tensor:
    """Positions that can carry loss: with token shift nothing predicts position 0."""
    if token_shift:
        maskable = maskable.clone()
        maskable[:, 0] = False
    return maskable
