"""`ar2dlm ppl`: held-out likelihood of the AR parent (perplexity) and of the dLM (a bound on it), on the same tokens.

    ar2dlm ppl --model runs/dlm/model --data heldout.txt --seq-len 256 --samples 8

AR parent: a plain causal forward; the token at p is scored from the logit at p - 1.

dLM: the negative ELBO of block diffusion. Each block is denoised on its own, conditioned on the clean earlier
blocks, so -log p(x) = sum over blocks of -log p(x_b | x_<b), and each term is bounded by the masked-diffusion ELBO.
For a block with n scored tokens:

    -log p(x_b | x_<b) <= E_{k ~ U{1..n}} E_{M: k of the n, uniformly} [(n / k) * sum_{i in M} CE_i(M masked)]

This is the continuous-time bound E_{t ~ U(0,1)} E_{M ~ Bernoulli(t)} [(1/t) sum_{i in M} CE_i] with t integrated out
(the chance of k masks given t, times 1/t, integrates to 1/k). We draw k rather than t because the t form misbehaves
as an estimator: forcing "at least one mask" into a Bernoulli(t) draw biases it (the 1/t weight then integrates to
infinity), and without forcing, one mask at small t carries weight 1/t, so the variance is infinite. With k every draw
masks at least one token, the estimate is unbiased and its variance finite. The `samples` draws of one sequence are
stratified: in every block, the S draws of k come from the S equal slices of U(0,1), in a random order.

One forward scores all blocks of a sequence at once (the [noisy | clean] training layout): a noisy block sees only
itself and the clean earlier blocks, so each block's term does not depend on the other blocks' masks.

Which tokens are scored: the maskable ones (every token of packed text; the response of chat/instruction records)
except position 0 of each sequence, which nothing predicts under token shift and the AR parent cannot score either.
So both numbers are over the same tokens, -log p(x_1.. | x_0) per sequence. Unscored tokens of a block (position 0, a
chat prompt) stay clean: they are conditioned on. A sequence ending inside a block is filled with mask tokens to the
block's end (unscored, always masked), which is what the decoder sees: it never knows where the text will stop.

Data (the shared loaders of `ar2dlm/data/`): plain text is packed into chunks of exactly --seq-len tokens (BOS/EOS
around each document; a final chunk shorter than seq_len / 2 is dropped and counted in `data.dropped_tail_tokens`);
in a .txt file each blank-line-separated paragraph is one document. Chat and instruction records are one sequence
each, truncated to --seq-len, with only the response scored (a prompt turn that follows a response inside the same
block is then conditioned on: use plain text for a strict comparison).

Per-token numbers are token-weighted: total nats over all scored tokens / their count; ppl = exp of that. The
standard error treats a sequence's draws as independent, so for stratified draws it overstates the error a little.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F

from ar2dlm import __version__
from ar2dlm.errors import Ar2dlmError
from ar2dlm.utils.devices import resolve_device
from ar2dlm.utils.files import check_output_file

SCHEMA = "ar2dlm.ppl/1"


@dataclass
class PplConfig:
    model: str = field(metadata={"help": "dLM folder; a plain AR model runs as a block-size-1 dLM (its bound is "
                                         "its exact NLL)"})
    data: str = field(metadata={"help": "held-out text: .txt (documents separated by blank lines), .jsonl/.json/"
                                        ".parquet with 'text' or chat/instruction records, or a hub dataset id"})
    base: str | None = field(default=None, metadata={"help": "AR parent (default: the one the dLM records)"})
    ar: bool = field(default=True, metadata={"help": "also score the AR parent"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence (text is packed into chunks of this)"})
    samples: int = field(default=8, metadata={"help": "Monte Carlo draws of the bound per sequence"})
    seed: int = field(default=0, metadata={"help": "seed of the masks (each sequence gets its own stream)"})
    batch_size: int = field(default=4, metadata={"help": "sequences per forward"})
    limit: int | None = field(default=None, metadata={"help": "read at most N records"})
    text_field: str | None = field(default=None, metadata={"help": "score this field as plain text"})
    fixed_t: float | None = field(default=None, metadata={"help": "diagnostic: mask ceil(t*n) of each block's n "
                                                                  "scored tokens in every draw (not the bound, except "
                                                                  "at block size 1)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if available)"})
    output: str = field(default="ppl.json", metadata={"help": "results JSON"})

    def __post_init__(self):
        if self.seq_len < 2:
            raise Ar2dlmError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.samples < 1:
            raise Ar2dlmError(f"--samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise Ar2dlmError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise Ar2dlmError(f"--limit must be >= 1, got {self.limit}")
        check_fixed_t(self.fixed_t)
        if self.seed < 0:
            raise Ar2dlmError(f"--seed must be >= 0, got {self.seed}")
        check_output_file(self.output, "--output")


def check_fixed_t(t: float | None) -> None:
    if t is not None and not 0.0 < t <= 1.0:
        raise Ar2dlmError(f"fixed t must be in (0, 1], got {t}")


# --------------------------------------------------------------------------------------------------- batches
@dataclass
class ScoredBatch:
    """Sequences to score, right-padded: tokens, then mask tokens to the end of the last block, then padding."""

    ids: torch.Tensor  # long [N, W]
    scored: torch.Tensor  # bool [N, W]: the tokens whose NLL counts
    tokens: torch.Tensor  # long [N]: real tokens per row
    lengths: torch.Tensor  # long [N]: real tokens + the mask fill (what the dLM attends to)

    def to(self, device) -> ScoredBatch:
        return ScoredBatch(self.ids.to(device), self.scored.to(device), self.tokens.to(device),
                           self.lengths.to(device))


def make_batch(rows: Sequence[tuple[Sequence[int], Sequence[bool]]], block_size: int, mask_id: int, pad_id: int,
               context: int | None = None) -> ScoredBatch:
    """rows: (token ids, maskable flags). Position 0 is never scored (see the module docstring)."""
    if not rows:
        raise Ar2dlmError("nothing to score")
    ns = [len(ids) for ids, _ in rows]
    if min(ns) < 2:
        raise Ar2dlmError("a sequence needs at least 2 tokens (the first one is only conditioned on)")
    fills = [-(-n // block_size) * block_size for n in ns]
    if context is not None:
        fills = [min(f, max(context, n)) for f, n in zip(fills, ns)]
    width = max(fills)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, ((toks, maskable), n, f) in enumerate(zip(rows, ns, fills)):
        if len(maskable) != n:
            raise Ar2dlmError(f"row {i}: {n} tokens but {len(maskable)} maskable flags")
        ids[i, :n] = torch.tensor(list(toks), dtype=torch.long)
        ids[i, n:f] = mask_id
        scored[i, :n] = torch.tensor(list(maskable), dtype=torch.bool)
    scored[:, 0] = False
    return ScoredBatch(ids, scored, torch.tensor(ns), torch.tensor(fills))


def row_seed(key: Sequence[int]) -> int:
    """A 63-bit seed from a tuple of non-negative ints (e.g. (seed, sequence index)), well mixed by SeedSequence."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)


def draw_masks(scored: torch.Tensor, block_size: int, samples: int, seeds: Sequence[int],
               fixed_t: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks and per-position weights ([S, N, W] bool, [S, N, W] float64) for `samples` draws of the bound.

    In each block with n scored tokens: k in {1..n} (stratified over the S draws, or ceil(fixed_t * n)), then k of
    the n chosen uniformly; every chosen position carries the weight n / k. Row i draws from its own generator
    seeded with seeds[i], so a row's masks do not depend on which rows share its batch.
    """
    check_fixed_t(fixed_t)
    scored = scored.cpu()
    n_rows, width = scored.shape
    nblocks = -(-width // block_size)
    masks = torch.zeros(samples, n_rows, nblocks * block_size, dtype=torch.bool)
    weights = torch.zeros(samples, n_rows, nblocks * block_size, dtype=torch.float64)
    idx = torch.arange(width)
    for r in range(n_rows):
        # draw over the row's own blocks (up to its last scored token), so that padding does not shift the stream
        used = int(torch.where(scored[r], idx + 1, 0).max())
        nb = -(-used // block_size)
        if nb == 0:
            continue
        ok = torch.zeros(nb * block_size, dtype=torch.bool)
        ok[:used] = scored[r, :used]
        ok = ok.view(nb, block_size)
        g = torch.Generator().manual_seed(seeds[r])
        n = ok.sum(-1).expand(samples, nb)
        if fixed_t is None:
            # argsort of iid uniforms is a uniform random permutation: which draw gets which slice of U(0,1)
            strata = torch.rand(samples, nb, generator=g).argsort(dim=0)
            u = (strata + torch.rand(samples, nb, generator=g)) / samples
            k = torch.floor(u * n).long() + 1
        else:
            k = torch.ceil(fixed_t * n).long()
        k = torch.minimum(k.clamp(min=1), n)  # blocks with nothing scored have n = 0 -> k = 0
        score = torch.rand(samples, nb, block_size, generator=g).masked_fill(~ok, -1.0)
        rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)
        chosen = rank < k[..., None]  # only scored positions: k <= n and unscored ones rank last
        w = (n / k.clamp(min=1)).double()[..., None].expand_as(chosen)
        masks[:, r, :nb * block_size] = chosen.reshape(samples, -1)
        weights[:, r, :nb * block_size] = torch.where(chosen, w, torch.zeros_like(w)).reshape(samples, -1)
    return masks[..., :width], weights[..., :width]


# --------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def masked_ce(dlm, batch: ScoredBatch, masked: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [N, W] (float32) of the dLM at the `masked` positions with exactly those masked, 0 elsewhere.

    The mask fill past each row's real tokens is masked too (it always is)."""
    dev = dlm.device
    ids, masked = batch.ids.to(dev), masked.to(dev)
    noisy = torch.where(masked, torch.full_like(ids, dlm.config.mask_token_id), ids)
    logits, targets = dlm.diffusion_logits(noisy, ids, masked, batch.lengths.to(dev))
    out = torch.zeros(masked.shape, dtype=torch.float32, device=dev)
    out[masked] = F.cross_entropy(logits.float(), targets, reduction="none")
    return out


@torch.no_grad()
def diffusion_nll(dlm, batch: ScoredBatch, samples: int, seeds: Sequence[int],
                  fixed_t: float | None = None) -> torch.Tensor:
    """Per-draw estimates of each row's negative ELBO, summed over its scored tokens: float64 [S, N] on the CPU."""
    masks, weights = draw_masks(batch.scored, dlm.config.block_size, samples, seeds, fixed_t)
    out = torch.zeros(samples, batch.ids.shape[0], dtype=torch.float64)
    for s in range(samples):
        ce = masked_ce(dlm, batch, masks[s]).cpu().double()
        out[s] = (ce * weights[s]).sum(1)
    return out


@torch.no_grad()
def greedy_match(dlm, batch: ScoredBatch) -> torch.Tensor:
    """bool [N]: would left-to-right greedy decoding (the engine's `ar` policy) produce every scored token?

    For in-block offset j: the scored tokens at offsets >= j are masked (and the mask fill), earlier ones are
    clean; the argmax at offset j must be the token. By induction this is the same as decoding from the context.
    """
    bsz = dlm.config.block_size
    offset = torch.arange(batch.ids.shape[1]) % bsz
    scored = batch.scored.cpu()
    ok = torch.ones(batch.ids.shape[0], dtype=torch.bool)
    dev = dlm.device
    ids, lengths = batch.ids.to(dev), batch.lengths.to(dev)
    for j in range(bsz):
        here = scored & (offset == j)
        if not here.any():
            continue
        masked = (scored & (offset >= j)).to(dev)
        noisy = torch.where(masked, torch.full_like(ids, dlm.config.mask_token_id), ids)
        logits, targets = dlm.diffusion_logits(noisy, ids, here.to(dev), lengths)
        miss = torch.zeros_like(here)
        miss[here] = (logits.argmax(-1) != targets).cpu()
        ok &= ~miss.any(1)
    return ok


@torch.no_grad()
def ar_nll(parent, batch: ScoredBatch) -> torch.Tensor:
    """NLL of each row's scored tokens under a Hugging Face causal LM, summed: float64 [N] on the CPU.

    Only the predicting positions go through the LM head (the full [N, W, V] logits would dominate memory)."""
    dev = next(parent.parameters()).device
    width = batch.ids.shape[1]
    real = torch.arange(width)[None] < batch.tokens[:, None]
    ids = torch.where(real, batch.ids, torch.zeros_like(batch.ids)).to(dev)  # no mask fill: the parent lacks it
    hidden = parent.get_decoder()(input_ids=ids, attention_mask=real.long().to(dev), use_cache=False)
    hidden = hidden.last_hidden_state
    target = batch.scored[:, 1:].to(dev)
    logits = parent.get_output_embeddings()(hidden[:, :-1][target]).float()
    nll = torch.zeros(target.shape, dtype=torch.float32, device=dev)
    nll[target] = F.cross_entropy(logits, ids[:, 1:][target], reduction="none")
    return nll.double().sum(1).cpu()


# --------------------------------------------------------------------------------------------------- data
def load_sequences(cfg: PplConfig, tokenizer):
    """(examples, stats) from the shared data loaders, keeping the sequences with a scored token after position 0;
    errors worded for ppl."""
    from ar2dlm.data.tokenize import DataConfig, read_records, tokenize_records

    dcfg = DataConfig(source=cfg.data, seq_len=cfg.seq_len, text_field=cfg.text_field, max_records=cfg.limit)
    if dcfg.source.strip() == "self":
        raise Ar2dlmError("--data self is the training corpus; give a held-out file or dataset")
    records, stats = read_records(dcfg)
    examples = [e for e in tokenize_records(records, tokenizer, dcfg, stats) if sum(e.maskable[1:]) > 0]
    if not examples:
        raise Ar2dlmError(f"{cfg.data}: nothing to score at --seq-len {cfg.seq_len} (a text shorter than half a "
                          "sequence is dropped; lower --seq-len)")
    return examples, stats


def _ppl(nats: float) -> float:
    return math.exp(min(nats, 700.0))


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1e6 else f"{x:.3e}"


def _batches(examples, size: int):
    for start in range(0, len(examples), size):
        yield start, examples[start:start + size]


def run_ppl(cfg: PplConfig) -> dict:
    from tqdm import tqdm

    from ar2dlm.evaluation.runner import load_model
    from ar2dlm.model.loading import load_base
    from ar2dlm.utils.files import write_json

    device = resolve_device(cfg.device)
    dlm, tok, is_dlm = load_model(cfg.model)
    dlm = dlm.to(device).eval()
    context = getattr(dlm.hf_config, "max_position_embeddings", None)
    if context is not None and cfg.seq_len > context:
        raise Ar2dlmError(f"--seq-len {cfg.seq_len} is longer than the model's context window ({context})")
    examples, stats = load_sequences(cfg, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    c = dlm.config
    rows = [(e.input_ids, e.maskable) for e in examples]
    n_scored = sum(sum(e.maskable[1:]) for e in examples)  # position 0 is never scored
    bar = dict(unit="seq", file=sys.stderr, dynamic_ncols=True)

    ar_result, parent_spec = None, None
    if cfg.ar:
        parent_spec = cfg.base or c.base_model or (None if is_dlm else cfg.model)
        if parent_spec is None:
            raise Ar2dlmError("the dLM does not record its AR parent: pass --base (or --no-ar)")
        parent, ptok = load_base(parent_spec, device=device)
        parent.eval()
        probe = examples[0].input_ids[:64]
        if ptok.convert_ids_to_tokens(probe) != tok.convert_ids_to_tokens(probe):
            raise Ar2dlmError(f"the AR parent {parent_spec} does not share the dLM's tokenizer")
        vocab = parent.get_input_embeddings().weight.shape[0]
        if max(max(e.input_ids) for e in examples) >= vocab:
            raise Ar2dlmError(f"the data holds token ids beyond the AR parent's vocabulary ({vocab}); does the text "
                              "contain the dLM's mask token?")
        total = 0.0
        with tqdm(total=len(rows), desc="AR parent", **bar) as progress:
            for _, chunk in _batches(rows, cfg.batch_size):
                total += float(ar_nll(parent, make_batch(chunk, 1, c.mask_token_id, pad_id)).sum())
                progress.update(len(chunk))
        ar_result = {"nll_total": total, "nll_per_token": total / n_scored, "ppl": _ppl(total / n_scored)}
        del parent

    total, var = 0.0, 0.0
    with tqdm(total=len(rows), desc=f"dLM bound ({cfg.samples} draws)", **bar) as progress:
        for start, chunk in _batches(rows, cfg.batch_size):
            batch = make_batch(chunk, c.block_size, c.mask_token_id, pad_id, context)
            seeds = [row_seed((cfg.seed, start + i)) for i in range(len(chunk))]
            draws = diffusion_nll(dlm, batch, cfg.samples, seeds, cfg.fixed_t)
            total += float(draws.mean(0).sum())
            if cfg.samples > 1:
                var += float((draws.var(0) / cfg.samples).sum())
            progress.update(len(chunk))
    per_token = total / n_scored
    dlm_result = {
        "block_size": c.block_size, "token_shift": c.token_shift, "samples": cfg.samples, "fixed_t": cfg.fixed_t,
        "is_bound": cfg.fixed_t is None or c.block_size == 1,
        "nelbo_total": total, "nelbo_per_token": per_token, "ppl_bound": _ppl(per_token),
        "stderr_per_token": math.sqrt(var) / n_scored if cfg.samples > 1 else None,
    }
    results = {
        "schema": SCHEMA, "ar2dlm_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.model, "base": parent_spec, "data": cfg.data, "settings": asdict(cfg),
        "sequences": len(rows), "scored_tokens": n_scored, "data_stats": asdict(stats),
        "ar": ar_result, "dlm": dlm_result,
        "gap_nats_per_token": per_token - ar_result["nll_per_token"] if ar_result else None,
    }
    write_json(cfg.output, results)
    return results


def summary_lines(results: dict) -> list[str]:
    d, a = results["dlm"], results["ar"]
    err = f" +- {d['stderr_per_token']:.4f}" if d["stderr_per_token"] is not None else ""
    lines = [f"{results['sequences']} sequences, {results['scored_tokens']} scored tokens"]
    if a is not None:
        lines.append(f"AR parent: {a['nll_per_token']:.4f} nats/token, ppl {_num(a['ppl'])}")
    if d["is_bound"]:
        lines.append(f"dLM bound (block {d['block_size']}, {d['samples']} draws): {d['nelbo_per_token']:.4f}{err} "
                     f"nats/token, ppl <= {_num(d['ppl_bound'])}")
    else:
        lines.append(f"dLM at fixed t={d['fixed_t']} (not a bound): {d['nelbo_per_token']:.4f}{err} nats/token")
    return lines
