"""Held-out check of a gated drafter: how many of its drafts a verify decoder would accept.

A verify step feeds the clean prefix up to a token t and a block of mask tokens after it. The parent's logit at t
gives the next token for free; the mask block's predictions are the drafts for the tokens after that one (offsets
+1, +2, ... beyond the parent's own next token), and a draft is accepted when it equals the parent's greedy token
there and every earlier draft was accepted. The targets are therefore the parent's greedy continuation of the
prefix, not the held-out text: `greedy_rollout` computes it for every block-aligned anchor at once, one forward per
offset, with the parent continuing each block token-causally on top of the clean prefix's cache.

Reported per evaluation (under `heldout_` in metrics.jsonl and summary.json): draft_acc_k, the share of anchors
whose k-th draft is right; draft_accepted, the mean accepted prefix of the drafts (so a verify step commits
1 + draft_accepted tokens on average at this block size); draft_anchors, how many anchors were checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ar2dlm.drafter.gated import GatedDrafterLM
from ar2dlm.training.trainer import Trainer

REPORTED_OFFSETS = 3


@dataclass
class DraftProbe:
    """A held-out batch with its anchors and the parent's greedy continuation of each."""

    clean_ids: torch.Tensor  # long [N, L]
    lengths: torch.Tensor  # long [N]
    anchors: torch.Tensor  # bool [N, L]: block starts p (> 0) whose whole block is held-out response
    greedy: torch.Tensor  # long [N, L]: at q, the parent's greedy token given the prefix before q's block and
    #                        its own greedy tokens from the block start up to q

    def to(self, device) -> "DraftProbe":
        return DraftProbe(*(t.to(device) for t in (self.clean_ids, self.lengths, self.anchors, self.greedy)))


@torch.no_grad()
def greedy_rollout(dlm: GatedDrafterLM, clean_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """For every block, the parent's greedy continuation of the clean text before it ([N, L]; block 0 keeps the
    text, which has no prefix to continue)."""
    seq_len = clean_ids.shape[1]
    clean_hidden, cache = dlm.clean_pass(clean_ids)
    stream = clean_ids.clone()
    offset = torch.arange(seq_len, device=clean_ids.device) % block_size
    starts = (offset == 0).nonzero().flatten()[1:]
    stream[:, starts] = dlm.logits(clean_hidden[:, starts - 1]).argmax(-1)  # the parent's next token, teacher-forced
    for k in range(1, block_size):
        hidden = dlm.noisy_pass(stream, cache, causal_in_block=True)
        cache.crop(-seq_len)  # drop this pass's K/V: the next pass starts again from the clean prefix
        at = (offset == k).nonzero().flatten()
        at = at[at >= block_size]
        stream[:, at] = dlm.logits(hidden[:, at - 1]).argmax(-1)
    return stream


def anchors_of(maskable: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block starts p > 0 whose block is entirely maskable (response tokens, not padding)."""
    n, seq_len = maskable.shape
    full = seq_len // block_size * block_size
    whole = torch.zeros_like(maskable)
    blocks = maskable[:, :full].view(n, -1, block_size).all(-1)
    whole[:, :full:block_size] = blocks
    whole[:, 0] = False
    return whole


@torch.no_grad()
def build_probes(dlm: GatedDrafterLM, batches, block_size: int | None = None) -> list[DraftProbe]:
    """Probes from padded held-out batches (input_ids, maskable, lengths); the parent is frozen, so once per run."""
    block_size = block_size or dlm.config.block_size
    was = dlm.training
    dlm.eval()
    probes = []
    for b in batches:
        ids = b.input_ids.to(dlm.device)
        probes.append(DraftProbe(ids, b.lengths.to(dlm.device), anchors_of(b.maskable, block_size).to(dlm.device),
                                 greedy_rollout(dlm, ids, block_size)))
    dlm.train(was)
    return probes


@torch.no_grad()
def draft_acceptance(dlm: GatedDrafterLM, probes: list[DraftProbe], block_size: int | None = None) -> dict:
    """Accuracy of the k-th draft and the mean accepted draft prefix over all anchors of `probes`."""
    block_size = block_size or dlm.config.block_size
    n_drafts = block_size - 1
    correct = torch.zeros(n_drafts, dtype=torch.float64)
    accepted, anchors = 0.0, 0
    was = dlm.training
    dlm.eval()
    for p in probes:
        _, cache = dlm.clean_pass(p.clean_ids)
        noisy = torch.full_like(p.clean_ids, dlm.config.mask_token_id)
        drafts = dlm.logits(dlm.noisy_pass(noisy, cache, p.lengths, block_size)).argmax(-1)
        rows, starts = p.anchors.nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        hits = torch.stack([drafts[rows, starts + k - 1] == p.greedy[rows, starts + k]
                            for k in range(1, n_drafts + 1)], dim=1)  # [anchors, drafts]
        correct += hits.sum(0).double().cpu()
        accepted += float(hits.long().cumprod(1).sum())
        anchors += rows.numel()
    dlm.train(was)
    out = {f"draft_acc_{k}": float(correct[k - 1]) / max(anchors, 1)
           for k in range(1, min(n_drafts, REPORTED_OFFSETS) + 1)}
    return {**out, "draft_accepted": accepted / max(anchors, 1), "draft_anchors": anchors}


class DrafterTrainer(Trainer):
    """The shared trainer, whose held-out evaluations also report draft acceptance (kept in its checkpointed
    `before`, so a resumed run reports the same starting point)."""

    def __init__(self, *args, probes: list[DraftProbe] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.probes = list(probes)

    def evaluate(self) -> dict:
        stats = super().evaluate()
        if self.probes:
            stats.update({f"heldout_{k}": v for k, v in draft_acceptance(self.objective.dlm, self.probes).items()})
        return stats
