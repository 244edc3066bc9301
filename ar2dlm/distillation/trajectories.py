"""Teacher trajectories for pseudo-trajectory distillation (d3LLM): in which order a teacher dLM decodes each block.

A trajectory is a token sequence (prompt + response) plus, for every response position, its *rank*: the step at
which the teacher committed it inside its block when decoding one token per forward (0 = first). Ranks are what
distillation needs to decide which tokens "can be known early" (see `samples.py`).

How ranks are found: *replay*. With the target tokens fixed, single-block decoding of block k only ever sees the final
tokens of blocks < k, which is exactly what the [noisy | clean] training layout gives every block at once. So all
blocks of a batch of sequences are decoded together in B forwards (B = block size): each forward scores every still
masked position, each block commits its best one (the target token goes in), and the step is recorded. For the
teacher's own greedy output and `rank_by="confidence"`, this is exactly the order in which the engine's `steps`
policy with k=1 decoded it (tested); for a reference answer it is the order the teacher would fill it in.

Scores (`rank_by`): `confidence` (the teacher's top-1 probability: Fast-dLLM / the `steps` policy), `entropy`
(lowest predictive entropy first: d3LLM's entropy policy) or `target` (the probability of the target token).

Storage: one JSON line per trajectory, `{"index": i, "input_ids": [...], "rank": [...], "block_size": B,
"teacher": ..., "rank_by": ..., "target": ...}` (i = the source record) with rank -1 for prompt positions. Written to `<file>.partial` batch by batch, so an
interrupted run resumes where it stopped, and renamed when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ar2dlm.data.batching import collate
from ar2dlm.data.records import iter_jsonl_file
from ar2dlm.data.tokenize import Example
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM

RANK_BY = ("confidence", "entropy", "target")


@dataclass
class Trajectory:
    input_ids: list[int]
    rank: list[int]  # per position: decode step inside its block, -1 where nothing is generated (prompt)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def maskable(self) -> list[bool]:
        return [r >= 0 for r in self.rank]


def _scores(logits: torch.Tensor, targets: torch.Tensor, rank_by: str) -> torch.Tensor:
    """Higher = decoded earlier. logits [M, V] at masked positions, targets [M]."""
    logp = logits.float().clamp(min=-1e4).log_softmax(-1)  # the ruled-out mask logit: 0 * log 0 stays 0
    if rank_by == "confidence":
        return logp.max(-1).values
    if rank_by == "entropy":
        return (logp.exp() * logp).sum(-1)  # minus the entropy
    if rank_by == "target":
        return logp.gather(-1, targets[:, None])[:, 0]
    raise Ar2dlmError(f"unknown rank_by {rank_by!r} (choose from {', '.join(RANK_BY)})")


@torch.no_grad()
def replay_ranks(dlm: BlockDiffusionLM, input_ids: torch.Tensor, generated: torch.Tensor,
                 lengths: torch.Tensor | None = None, rank_by: str = "confidence") -> torch.Tensor:
    """Decode order of the `generated` positions (bool [N, L]) with the target tokens forced: long [N, L] ranks.

    One forward per step; each block with masked positions commits its best-scored one (ties: leftmost).
    """
    if rank_by not in RANK_BY:
        raise Ar2dlmError(f"unknown rank_by {rank_by!r} (choose from {', '.join(RANK_BY)})")
    B = dlm.config.block_size
    n, seq_len = input_ids.shape
    if dlm.config.token_shift and generated[:, 0].any():
        raise Ar2dlmError("position 0 cannot be generated with token shift on (nothing predicts it)")
    pad = (-seq_len) % B  # whole blocks, so that positions can be grouped per block
    ids = torch.nn.functional.pad(input_ids, (0, pad))
    pending = torch.nn.functional.pad(generated, (0, pad))
    if lengths is None:
        lengths = torch.full((n,), seq_len, dtype=torch.long, device=input_ids.device)
    rank = torch.full_like(ids, -1)
    noisy = torch.where(pending, dlm.config.mask_token_id, ids)
    was = dlm.training
    dlm.eval()
    for step in range(B):
        if not pending.any():
            break
        hidden = dlm.predictor_hidden(dlm.training_hidden(noisy, ids, lengths))
        score = torch.full(ids.shape, float("-inf"), device=ids.device)
        score[pending] = _scores(dlm.logits(hidden[pending]), ids[pending], rank_by)
        best = score.view(n, -1, B).argmax(-1)  # first maximum: the leftmost on ties
        has = pending.view(n, -1, B).any(-1)
        rows, blocks = has.nonzero(as_tuple=True)
        pos = blocks * B + best[rows, blocks]
        noisy[rows, pos] = ids[rows, pos]
        pending[rows, pos] = False
        rank[rows, pos] = step
    dlm.train(was)
    return rank[:, :seq_len]


def replay(dlm: BlockDiffusionLM, examples: list[Example], pad_id: int, rank_by: str = "confidence"
           ) -> list[Trajectory]:
    """Trajectories of examples (tokens + which positions are generated), one batched replay."""
    batch = collate(examples, pad_id, pad_to_multiple=1)
    dev = dlm.device
    ranks = replay_ranks(dlm, batch.input_ids.to(dev), batch.maskable.to(dev), batch.lengths.to(dev), rank_by)
    return [Trajectory(list(e.input_ids), ranks[i, :len(e)].tolist()) for i, e in enumerate(examples)]


# ------------------------------------------------------------------------------------------------------ files
def write_trajectories(path: str | Path, examples: list[Example], dlm: BlockDiffusionLM, pad_id: int, *,
                       rank_by: str, meta: dict, batch_size: int = 8,
                       make_targets: Callable[[list[Example]], list[Example | None]] | None = None) -> Path:
    """Replay `examples` into a trajectory file, after `make_targets` (e.g. the teacher's own answers; it returns one
    example per input, or None to drop it).

    Resumable: finished batches sit in `<path>.partial`, each line tagged with its example's index; a rerun starts
    at the first batch after the last index written and skips lines already there. Returns the final path.
    """
    path = Path(path)
    if path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = {rec["index"] for _, rec in iter_jsonl_file(partial)} if partial.exists() else set()
    if written and max(written) >= len(examples):
        raise Ar2dlmError(f"{partial} does not belong to these examples: delete it and start again")
    first = (max(written) + 1) // batch_size * batch_size if written else 0
    with partial.open("a") as f, tqdm(total=len(examples), initial=first, desc="trajectories",
                                      dynamic_ncols=True) as bar:
        for start in range(first, len(examples), batch_size):
            group = examples[start:start + batch_size]
            targets = make_targets(group) if make_targets else group
            keep = [(start + k, t) for k, t in enumerate(targets) if t is not None and start + k not in written]
            if keep:
                for (index, _), t in zip(keep, replay(dlm, [t for _, t in keep], pad_id, rank_by)):
                    f.write(json.dumps({"index": index, "input_ids": t.input_ids, "rank": t.rank, **meta}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            bar.update(len(group))
    os.replace(partial, path)
    return path


def read_trajectories(path: str | Path, block_size: int) -> list[Trajectory]:
    """Trajectories from a file; each must have been recorded at `block_size` and be well formed."""
    out = []
    for where, rec in iter_jsonl_file(Path(path)):
        if not isinstance(rec, dict) or not isinstance(rec.get("input_ids"), list) or \
                not isinstance(rec.get("rank"), list) or len(rec["input_ids"]) != len(rec["rank"]):
            raise Ar2dlmError(f"{where}: a trajectory needs 'input_ids' and 'rank' lists of equal length")
        if rec.get("block_size") != block_size:
            raise Ar2dlmError(f"{where}: recorded at block size {rec.get('block_size')}, the model uses {block_size}")
        if not any(r >= 0 for r in rec["rank"]):
            raise Ar2dlmError(f"{where}: no generated position")
        out.append(Trajectory([int(t) for t in rec["input_ids"]], [int(r) for r in rec["rank"]]))
    if not out:
        raise Ar2dlmError(f"{path}: no trajectories")
    return out
