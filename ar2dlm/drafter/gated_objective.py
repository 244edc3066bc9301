"""The gated drafter's training objective: its drafts at masked positions against a target, as sums.

The clean half of the layout has no trainable path (every clean position is the frozen parent), so it runs once
without gradients and hands the noisy half its K/V, detached; only the noisy half is back-propagated. The same
clean pass gives the parent's teacher-forced logits at every position for free, which is what the `argmax` (CE)
and `distribution` (KL) targets learn from; `text` learns the data's own tokens (the parent's own answers when the
data is its greedy self corpus).

Under token shift a block's first token is predicted by the clean stream, i.e. by the parent itself, which the
adapter cannot change: only masked positions inside a block are scored (`drafter_scored`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ar2dlm.drafter.gated import GatedDrafterLM
from ar2dlm.errors import Ar2dlmError

TARGETS = ("text", "argmax", "distribution")


def drafter_scored(masked: torch.Tensor, block_size: int) -> torch.Tensor:
    """The masked positions whose prediction comes from a mask position (not from the parent's clean stream)."""
    pos = torch.arange(masked.shape[1], device=masked.device)
    return masked & (pos % block_size != 0)[None, :]


def full_blocks(maskable: torch.Tensor, clean_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Noisy ids with every maskable token masked: each block is then a clean prefix followed by a block of mask
    tokens, exactly what a verify decoder drafts from."""
    return torch.where(maskable, torch.full_like(clean_ids, mask_token_id), clean_ids)


class DrafterObjective(nn.Module):
    """Summed loss and correct drafts over the scored positions (the trainer normalises by their global count).

    `split=False` computes both halves in one forward with gradients (the reference the split path must match).
    Under gradient checkpointing the whole layout is used too: Hugging Face drops the cache there (a replayed layer
    would write it twice), and the noisy half needs the cache to reach the clean K/V.
    """

    def __init__(self, dlm: GatedDrafterLM, target: str = "argmax", split: bool = True):
        super().__init__()
        if target not in TARGETS:
            raise Ar2dlmError(f"unknown drafter target {target!r} (choose {', '.join(TARGETS)})")
        self.dlm, self.target, self.split = dlm, target, split

    def halves(self, noisy_ids, clean_ids, lengths, block_size) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy hidden with gradients, clean hidden without) of the layout, each [N, L, H]."""
        if self.split and not self.dlm.checkpointing:
            clean_hidden, cache = self.dlm.clean_pass(clean_ids)
            return self.dlm.noisy_pass(noisy_ids, cache, lengths, block_size), clean_hidden
        hidden = self.dlm.training_hidden(noisy_ids, clean_ids, lengths, block_size)
        seq_len = clean_ids.shape[1]
        return hidden[:, :seq_len], hidden[:, seq_len:].detach()

    def forward(self, noisy_ids, clean_ids, scored, lengths=None, block_size=None):
        block_size = block_size or self.dlm.config.block_size
        if (scored & ~drafter_scored(scored, block_size)).any():
            raise ValueError("a drafter scores no block's first position (the parent predicts it, not the adapter)")
        noisy_hidden, clean_hidden = self.halves(noisy_ids, clean_ids, lengths, block_size)
        rows, cols = scored.nonzero(as_tuple=True)
        logits = self.dlm.logits(noisy_hidden[rows, cols - 1]).float()  # token shift: the slot before predicts
        if self.target == "text":
            targets = clean_ids[rows, cols]
            return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()
        with torch.no_grad():
            parent = self.dlm.logits(clean_hidden[rows, cols - 1]).float()
        if self.target == "argmax":
            targets = parent.argmax(-1)
            loss = F.cross_entropy(logits, targets, reduction="sum")
        else:  # KL(parent || drafter), summed over positions
            loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(parent, -1), reduction="sum", log_target=True)
            targets = parent.argmax(-1)
        return loss, (logits.argmax(-1) == targets).sum()
