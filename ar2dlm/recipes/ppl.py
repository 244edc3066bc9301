"""`ar2dlm ppl`: held-out likelihood of the AR parent (perplexity) and of the dLM (a bound on it), on the same tokens.

    ar2dlm ppl --model runs/dlm/model --data heldout.txt --seq-len 256 --samples 8

The estimators, and which tokens they score, are `ar2dlm.evaluation.likelihood`'s.

Data (the shared loaders of `ar2dlm/data/`): plain text is packed into chunks of exactly --seq-len tokens (BOS/EOS
around each document; a final chunk shorter than seq_len / 2 is dropped and counted in `data.dropped_tail_tokens`);
in a .txt file each blank-line-separated paragraph is one document. Chat and instruction records are one sequence
each, truncated to --seq-len, with only the response scored (a prompt turn that follows a response inside the same
block is then conditioned on: use plain text for a strict comparison).

Per-token numbers are token-weighted: total nats over all scored tokens / their count; ppl = exp of that. The
standard error treats a sequence's draws as independent, so for stratified draws it overstates the error a little.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from ar2dlm import __version__
from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.likelihood import ar_nll, check_fixed_t, diffusion_nll, make_batch, row_seed
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
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



def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, PplConfig)


def config_from_args(args: argparse.Namespace) -> PplConfig:
    return dataclass_from_args(PplConfig, args)


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


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="seq", file=sys.stderr, dynamic_ncols=True)


def _ar_result(cfg: PplConfig, parent_spec: str, tok, examples, rows, pad_id: int, mask_id: int, device) -> dict:
    """The AR parent's NLL of the scored tokens: the same tokenizer, no mask token in the data."""
    from ar2dlm.model.loading import load_base

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
    with _progress(len(rows), "AR parent") as progress:
        for _, chunk in _batches(rows, cfg.batch_size):
            total += float(ar_nll(parent, make_batch(chunk, 1, mask_id, pad_id)).sum())
            progress.update(len(chunk))
    n_scored = _scored_tokens(rows)
    return {"nll_total": total, "nll_per_token": total / n_scored, "ppl": _ppl(total / n_scored)}


def _dlm_result(cfg: PplConfig, dlm, rows, pad_id: int, context: int | None) -> dict:
    """The dLM's bound (or its fixed-t diagnostic), with the standard error of the Monte Carlo mean."""
    c = dlm.config
    total, var = 0.0, 0.0
    with _progress(len(rows), f"dLM bound ({cfg.samples} draws)") as progress:
        for start, chunk in _batches(rows, cfg.batch_size):
            batch = make_batch(chunk, c.block_size, c.mask_token_id, pad_id, context)
            seeds = [row_seed((cfg.seed, start + i)) for i in range(len(chunk))]
            draws = diffusion_nll(dlm, batch, cfg.samples, seeds, cfg.fixed_t)
            total += float(draws.mean(0).sum())
            if cfg.samples > 1:
                var += float((draws.var(0) / cfg.samples).sum())
            progress.update(len(chunk))
    n_scored = _scored_tokens(rows)
    per_token = total / n_scored
    return {
        "block_size": c.block_size, "token_shift": c.token_shift, "samples": cfg.samples, "fixed_t": cfg.fixed_t,
        "is_bound": cfg.fixed_t is None or c.block_size == 1,
        "nelbo_total": total, "nelbo_per_token": per_token, "ppl_bound": _ppl(per_token),
        "stderr_per_token": math.sqrt(var) / n_scored if cfg.samples > 1 else None,
    }


def _scored_tokens(rows) -> int:
    return sum(sum(maskable[1:]) for _, maskable in rows)  # position 0 is never scored


def run(cfg: PplConfig) -> dict:
    from ar2dlm.model.open import context_length, open_for_decoding, parent_spec
    from ar2dlm.utils.files import write_json

    device = resolve_device(cfg.device)
    dlm, tok, _ = open_for_decoding(cfg.model, device=device)
    context = context_length(dlm)
    if context is not None and cfg.seq_len > context:
        raise Ar2dlmError(f"--seq-len {cfg.seq_len} is longer than the model's context window ({context})")
    examples, stats = load_sequences(cfg, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [(e.input_ids, e.maskable) for e in examples]

    ar_result, parent = None, None
    if cfg.ar:
        parent = parent_spec(dlm, cfg.base, missing="pass --base (or --no-ar)")
        ar_result = _ar_result(cfg, parent, tok, examples, rows, pad_id, dlm.config.mask_token_id, device)
    dlm_result = _dlm_result(cfg, dlm, rows, pad_id, context)
    results = {
        "schema": SCHEMA, "ar2dlm_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.model, "base": parent, "data": cfg.data, "settings": asdict(cfg),
        "sequences": len(rows), "scored_tokens": _scored_tokens(rows), "data_stats": asdict(stats),
        "ar": ar_result, "dlm": dlm_result,
        "gap_nats_per_token": dlm_result["nelbo_per_token"] - ar_result["nll_per_token"] if ar_result else None,
    }
    write_json(cfg.output, results)
    print("\n".join(summary_lines(results)))
    print(f"wrote {cfg.output}", file=sys.stderr)
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
