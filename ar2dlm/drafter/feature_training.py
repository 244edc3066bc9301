"""`ar2dlm convert --drafter-kind feature`: train a feature drafter on the parent's cached features.

One path for the data: examples (the parent's own greedy answers: `--data self --self-answer-temperature 0`, or
`--answers-from-parent` on a chat data file) -> the parent's features, computed once (`feature_cache.FeatureCache`)
-> anchors -> drafter micro-batches -> position-weighted masked-diffusion loss.

An *anchor* is a committed position j whose next token is an answer token: the drafter sees the parent's features
at the `window` positions before j and the token at j, fills the block of masks after it, and is scored against
the tokens at j+1 .. j+B-1 (the parent's own continuation, as the examples are its greedy answers). Every answer
position is an anchor, so a sequence teaches B - 1 predictions per token; `--anchors-per-sequence` caps how many
one micro-batch takes from a sequence (drawn at random, seeded, so a resumed run draws the same). Early block
positions count most (weight `decay ** (k - 1)` at draft k): a draft is only worth something if all before it are
accepted. The parent is never run in training: a step costs the drafter's few layers and the LM head on the drafts.

The held-out check is the verify policy's own acceptance: for every anchor of the held-out examples, the greedy
drafts are compared with the parent's continuation; the leading run of correct drafts is what a verify forward
would accept (`heldout_draft_acc_k`: draft k right and all before it; `heldout_draft_accepted`: the mean run; tokens
per verify step = 1 + that).

The loop is the shared trainer's (accumulation, time budget, checkpoints, exact resume, metrics).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ar2dlm.drafter.feature import FeatureDrafterConfig, FeatureDrafterLM, default_feature_layers
from ar2dlm.drafter.feature_cache import FeatureCache
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.loading import cache_dir, load_base, resolve_model_source
from ar2dlm.training.optim import build_optimizer
from ar2dlm.training.trainer import Trainer, heldout_stats

log = logging.getLogger(__name__)

HELDOUT_ANCHORS = 4096  # at most this many held-out anchors are scored (spread evenly over the held-out examples)


class FeatureBatch:
    """Anchors as the drafter consumes them: the features of the positions their windows cover (each position once,
    [P, F]), each window's rows into them ([A, W], `valid` where the slot is a real position), anchor ids [A],
    targets [A, D] (-1: not scored) and the per-draft loss weights [D]."""

    def __init__(self, features, index, valid, anchors, targets, weights):
        self.features, self.index, self.valid = features, index, valid
        self.anchors, self.targets, self.weights = anchors, targets, weights

    def to(self, device):
        return FeatureBatch(*(t.to(device) for t in self.args()))

    def args(self) -> tuple:
        return self.features, self.index, self.valid, self.anchors, self.targets, self.weights

    @property
    def n_scored(self) -> int:
        return int((self.targets >= 0).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.anchors.shape[0])

    block_size = None


def anchor_positions(maskable: torch.Tensor) -> torch.Tensor:
    """Positions j >= 1 whose next token is an answer token (maskable)."""
    nxt = torch.zeros_like(maskable)
    nxt[:-1] = maskable[1:]
    nxt[0] = False
    return nxt.nonzero().squeeze(1)


def make_batch(sequences, picks: list[tuple[int, torch.Tensor]], window: int, drafts: int,
               decay: float) -> FeatureBatch:
    """Anchors `picks` = [(example index, anchor positions)] of `sequences` [(ids, maskable, features)]."""
    feats, index, valid, anchors, targets = [], [], [], [], []
    offsets = torch.arange(-window, 0)
    steps = torch.arange(1, drafts + 1)
    base = 0
    for i, positions in picks:
        ids, maskable, features = sequences[i]
        n = ids.shape[0]
        covered = int(positions.max())  # windows end before their anchor
        feats.append(features[:covered])
        ctx = positions[:, None] + offsets[None, :]  # [A, W]
        valid.append(ctx >= 0)
        index.append(base + ctx.clamp(min=0))
        base += covered
        anchors.append(ids[positions])
        at = (positions[:, None] + steps[None, :]).clamp(max=n - 1)  # [A, D]
        scored = (positions[:, None] + steps[None, :] < n) & maskable[at]
        targets.append(torch.where(scored, ids[at], torch.full_like(at, -1)))
    weights = decay ** (steps - 1).float()
    return FeatureBatch(torch.cat(feats), torch.cat(index), torch.cat(valid), torch.cat(anchors), torch.cat(targets),
                        weights)


class AnchorSampler:
    """Epochs over the training examples in a seeded order, `batch_size` examples per micro-batch, at most
    `per_sequence` anchors of each (a seeded draw). Its state (epoch, position, RNG) makes resume exact."""

    def __init__(self, sequences, indices: list[int], batch_size: int, per_sequence: int, seed: int):
        self.sequences, self.indices = sequences, list(indices)
        self.batch_size, self.per_sequence, self.seed = batch_size, per_sequence, seed
        self.epoch, self.position = 0, 0
        self.generator = torch.Generator().manual_seed(seed)
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return [self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()]

    def next_picks(self) -> list[tuple[int, torch.Tensor]]:
        picks = []
        while len(picks) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled()
            index = self._order[self.position]
            self.position += 1
            positions = anchor_positions(self.sequences[index][1])
            if positions.numel() > self.per_sequence:
                keep = torch.randperm(positions.numel(), generator=self.generator)[:self.per_sequence]
                positions = positions[keep.sort().values]
            if positions.numel():
                picks.append((index, positions))
        return picks

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.generator.set_state(state["rng"])
        self._order = self._shuffled()


class FeatureObjective(nn.Module):
    """Sums over a micro-batch: position-weighted cross-entropy, correct drafts (for the trainer's log)."""

    stat_names = ("loss", "masked_acc")

    def __init__(self, dlm: FeatureDrafterLM):
        super().__init__()
        self.dlm = dlm

    def forward(self, features, index, valid, anchors, targets, weights):
        hidden = self.dlm.draft_hidden(features.float(), valid, anchors, targets.shape[1], index)
        scored = targets >= 0
        wanted = self.dlm.to_draft_vocab(targets[scored])  # -1: outside the draft vocabulary, never draftable
        scores = self.dlm.draft_scores(hidden[scored])
        inside = wanted >= 0
        loss = F.cross_entropy(scores[inside].float(), wanted[inside], reduction="none")
        w = weights[None, :].expand_as(targets)[scored][inside]
        correct = (scores.argmax(-1) == wanted).sum()
        return (loss * w).sum(), correct


@torch.no_grad()
def draft_acceptance(dlm: FeatureDrafterLM, batches: list[FeatureBatch]) -> dict:
    """What a greedy verify forward would accept after each held-out anchor (see the module docstring)."""
    drafts = dlm.config.block_size - 1
    runs, anchors = [], 0
    right_at = torch.zeros(drafts)
    for b in batches:
        scores = dlm.draft_scores(dlm.draft_hidden(b.features.float(), b.valid, b.anchors, drafts, b.index))
        guess = scores.argmax(-1)
        right = (guess == dlm.to_draft_vocab(b.targets)) & (b.targets >= 0)
        leading = right.long().cumprod(dim=1)  # draft k right and every draft before it
        right_at += leading.sum(0).float().cpu()
        runs.append(leading.sum(1).float().cpu())
        anchors += b.anchors.shape[0]
    if not anchors:
        return {}
    stats = {f"draft_acc_{k + 1}": float(right_at[k]) / anchors for k in range(drafts)}
    stats.update(draft_accepted=float(torch.cat(runs).mean()), draft_anchors=anchors)
    return stats


class FeatureTrainer(Trainer):
    """The shared trainer whose held-out evaluation adds the verify acceptance of the drafts."""

    def evaluate(self) -> dict:
        if not self.heldout:
            return {}
        stats = heldout_stats(self.model, self.heldout, self.autocast, self.names)
        stats.update({f"heldout_{k}": v for k, v in draft_acceptance(self.objective.dlm, self.heldout).items()})
        return stats


def draft_vocabulary(examples, size: int) -> torch.Tensor:
    """The `size` most frequent answer tokens of the examples (what the drafter will be asked to draft), in id
    order; fewer when the answers hold fewer distinct tokens."""
    counts = torch.zeros(max(max(e.input_ids) for e in examples) + 1, dtype=torch.long)
    for e in examples:
        answer = torch.tensor([t for t, m in zip(e.input_ids, e.maskable) if m], dtype=torch.long)
        counts.index_add_(0, answer, torch.ones_like(answer))
    seen = int((counts > 0).sum())
    return counts.topk(min(size, seen)).indices.sort().values


def feature_cache_folder(cfg, parent: str, layers: list[int]) -> Path:
    if cfg.feature_cache:
        return Path(cfg.feature_cache).expanduser()
    data = Path(str(cfg.data)).stem or "data"
    return cache_dir() / "features" / f"{Path(parent).name}-{data}-L{'-'.join(map(str, layers))}"


def parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise Ar2dlmError(f"--feature-layers must be comma-separated layer counts, got {text!r}") from None


def heldout_batches(sequences, indices: list[int], cfg, window: int, drafts: int) -> list[FeatureBatch]:
    """Every anchor of the held-out examples (at most HELDOUT_ANCHORS, evenly spread), in fixed micro-batches."""
    picks = [(i, anchor_positions(sequences[i][1])) for i in indices]
    total = sum(p.numel() for _, p in picks)
    if total > HELDOUT_ANCHORS:
        stride = -(-total // HELDOUT_ANCHORS)
        picks = [(i, p[::stride]) for i, p in picks]
    picks = [(i, p) for i, p in picks if p.numel()]
    return [make_batch(sequences, picks[s:s + cfg.batch_size], window, drafts, cfg.position_decay)
            for s in range(0, len(picks), cfg.batch_size)]


def train(cfg, info, device, prepare_examples) -> dict:
    """The whole job (single process): model, examples, feature cache, loop, final drafter and summary.
    `prepare_examples(cfg, backbone, tokenizer, info)` is the conversion's own data step."""
    from ar2dlm.data.tokenize import split_heldout
    from ar2dlm.training.runs import complete_run, finish_run
    from ar2dlm.training.trainer import check_run_folder
    from ar2dlm.utils.files import write_json

    if info.world_size > 1:
        raise Ar2dlmError("--drafter-kind feature trains in one process (its step is small; torchrun is not needed)")
    out = Path(cfg.output)
    check_run_folder(cfg)
    torch.manual_seed(cfg.seed)
    backbone, tokenizer = load_base(cfg.model, dtype=torch.float32)
    parent = resolve_model_source(cfg.model)
    layers = parse_layers(cfg.feature_layers) or default_feature_layers(backbone.config.num_hidden_layers)
    FeatureDrafterConfig(layers, cfg.draft_layers, cfg.feature_window).check(backbone.config.num_hidden_layers)
    examples = prepare_examples(cfg, backbone, tokenizer, info)  # (a parent may write them: after the checks)
    vocab = draft_vocabulary(examples, cfg.draft_vocab) if cfg.draft_vocab else None
    dlm = FeatureDrafterLM.from_base(backbone, tokenizer, cfg.block_size, base_model=parent,
                                     feature_layers=layers, num_layers=cfg.draft_layers,
                                     window=cfg.feature_window, draft_vocab=0 if vocab is None else vocab.numel(),
                                     mask_token=cfg.mask_token)
    if vocab is not None:
        dlm.set_draft_vocab(vocab)
    if cfg.init_drafter:
        _init_from(dlm, cfg.init_drafter)
    dlm.to(device)
    cache = FeatureCache(feature_cache_folder(cfg, parent, layers), parent, layers, dlm.feature_dim, examples)
    dlm.eval()
    cache.build(lambda ids, mask: dlm.features_of(ids.to(device), mask.to(device)))
    sequences = cache.load()
    train_idx, held_idx = split_heldout(list(range(len(sequences))), cfg.heldout, seed=cfg.seed)
    drafts = cfg.block_size - 1
    objective = FeatureObjective(dlm)
    trainer = FeatureTrainer(cfg, info=info, device=device, objective=objective, model=objective, out=out,
                             desc="convert (feature drafter)", optimizer=build_optimizer(objective, cfg.lr,
                                                                                         cfg.weight_decay))
    trainer.heldout = [b.to(device) for b in heldout_batches(sequences, held_idx, cfg, dlm.drafter_cfg.window,
                                                             drafts)]
    write_json(out / "config.json", asdict(cfg))
    sampler = AnchorSampler(sequences, train_idx, cfg.batch_size, cfg.anchors_per_sequence, cfg.seed)
    dlm.train()
    after = trainer.run(
        next_micro=lambda fraction: make_batch(sequences, sampler.next_picks(), dlm.drafter_cfg.window, drafts,
                                               cfg.position_decay),
        data_state=sampler.state_dict, load_data_state=sampler.load_state_dict)
    dlm.eval()
    summary = finish_run(cfg, trainer, after, dlm, tokenizer,
                         title=f"{Path(cfg.model).name} -> feature drafter (B={cfg.block_size})")
    summary["drafter"] = feature_summary(cfg, dlm, trainer.state["before"], after)
    summary["feature_cache"] = str(cache.folder)
    complete_run(cfg, summary, info)
    return summary


def feature_summary(cfg, dlm: FeatureDrafterLM, before: dict, after: dict) -> dict:
    drafts = cfg.block_size - 1

    def row(stats: dict) -> dict:
        accs = [stats.get(f"heldout_draft_acc_{k}") for k in range(1, drafts + 1)]
        accepted = stats.get("heldout_draft_accepted")
        return {"draft_acc": accs, "tokens_per_verify_step": None if accepted is None else 1.0 + accepted}

    return {"kind": "feature", **asdict(dlm.drafter_cfg), "anchors": after.get("heldout_draft_anchors", 0),
            "trainable_parameters": sum(p.numel() for p in dlm.trainable_parameters()),
            "before": row(before), "after": row(after)}


def _init_from(dlm: FeatureDrafterLM, spec: str) -> None:
    """Start from a saved feature drafter's weights (same parent, same shapes)."""
    from safetensors.torch import load_file

    from ar2dlm.drafter.feature import WEIGHTS_FILE, is_feature_drafter_folder, read_feature_drafter_config
    from ar2dlm.model.loading import resolve_dlm_path

    path = resolve_dlm_path(spec)
    if not is_feature_drafter_folder(path):
        raise Ar2dlmError(f"--init-drafter {spec}: not a feature drafter folder")
    meta = read_feature_drafter_config(path)
    if resolve_model_source(meta["base_model"]) != dlm.config.base_model:
        raise Ar2dlmError(f"--init-drafter {spec} was trained for {meta['base_model']}, this run's parent is "
                          f"{dlm.config.base_model}")
    if meta["feature_drafter"]["feature_layers"] != dlm.drafter_cfg.feature_layers:
        raise Ar2dlmError(f"--init-drafter {spec} reads feature layers {meta['feature_drafter']['feature_layers']}, "
                          f"this run {dlm.drafter_cfg.feature_layers}")
    # the draft vocabulary stays this run's (the most frequent tokens of its own data)
    dlm.load_drafter_state(load_file(str(path / WEIGHTS_FILE)), spec, vocab=False)
