"""A deliberately simple block-diffusion decoder: no KV cache, the whole sequence recomputed every forward.

It is the ground truth that faster decoders are checked against, and a quick way to measure how parallel a freshly
converted model is (tokens per forward, TPF). Blocks are aligned to absolute positions (as in training), so the
first block after the prompt may be partial: its prompt tokens are given, the rest start masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.attention import block_causal_mask
from ar2dlm.model.dlm import BlockDiffusionLM


@dataclass
class ReferenceResult:
    tokens: list[int]  # generated tokens, up to and including the first stop token
    nfe: int  # forward passes

    @property
    def tpf(self) -> float:
        return len(self.tokens) / max(self.nfe, 1)


def _choose(conf: torch.Tensor, still_masked: torch.Tensor, policy: str, threshold: float) -> torch.Tensor:
    """Which still-masked positions of the block to commit this forward."""
    if policy == "ar":  # leftmost masked position only: the autoregressive baseline inside the same loop
        commit = torch.zeros_like(still_masked)
        commit[still_masked.nonzero()[0]] = True
        return commit
    conf = conf.masked_fill(~still_masked, -1.0)
    commit = still_masked & (conf > threshold)
    if not commit.any():
        commit[conf.argmax()] = True
    return commit


@torch.no_grad()
def reference_generate(
    dlm: BlockDiffusionLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    threshold: float = 0.9,
    policy: str = "threshold",
    stop_ids: tuple[int, ...] = (),
) -> ReferenceResult:
    """Greedy decoding, block by block; `threshold` policy commits every masked token with confidence > threshold."""
    if policy not in ("threshold", "ar"):
        raise Ar2dlmError(f"unknown reference policy {policy!r}")
    if not 0.0 <= threshold <= 1.0:
        raise Ar2dlmError(f"threshold must be in [0, 1], got {threshold}")
    if not prompt_ids:
        raise Ar2dlmError("empty prompt")
    bsz, mask_id, shift = dlm.config.block_size, dlm.config.mask_token_id, dlm.config.token_shift
    device = dlm.device
    seq = torch.tensor(prompt_ids, device=device)
    limit = len(prompt_ids) + max_new_tokens
    nfe = 0
    while seq.numel() < limit:
        start = seq.numel()
        end = min((start // bsz + 1) * bsz, limit)
        seq = torch.cat([seq, torch.full((end - start,), mask_id, device=device)])
        mask = block_causal_mask(end, bsz, device=device)
        pos = torch.arange(end, device=device)[None]
        while (seq[start:end] == mask_id).any():
            logits, _ = dlm(seq[None], attention_mask=mask, position_ids=pos, use_cache=False)
            nfe += 1
            rows = logits[0, start - 1 : end - 1] if shift else logits[0, start:end]
            conf, tok = rows.float().softmax(-1).max(-1)
            still = seq[start:end] == mask_id
            commit = _choose(conf, still, policy, threshold)
            seq[start:end] = torch.where(commit, tok, seq[start:end])
        new = seq[len(prompt_ids):].tolist()
        stops = [i for i, t in enumerate(new) if t in stop_ids]
        if stops:
            return ReferenceResult(new[: stops[0] + 1], nfe)
    return ReferenceResult(seq[len(prompt_ids):].tolist(), nfe)
