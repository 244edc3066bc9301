"""One evaluation point: the samples decoded with one decode setting, resumably, scored and summarized.

`ar2dlm eval` (recipes/eval.py) runs one point per sweep value. A point's samples are decoded in batches by the
engine; each finished sample is appended to a partial file keyed by (point, sample id, exact prompt text), so an
interrupted run resumes without redoing it. Scores come from the task (accuracy) or, for fidelity, from agreement
with the AR parent's answers and the parent's NLL of the text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

import torch

from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.errors import Ar2dlmError
from ar2dlm.utils.files import appended_records


class ParentLM(torch.nn.Module):
    """The AR parent as `completion_nll` wants it (`model(ids).logits`), via its block-size-1 wrapper."""

    def __init__(self, dlm):
        super().__init__()
        self.dlm = dlm
        self.config = dlm.hf_config

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.dlm(input_ids, use_cache=False)[0])


def record_key(obj) -> str:
    """A short stable hash of a JSON-able value: what identifies a point (model, decode settings, task) or a prompt
    in the partial file."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()[:16]


class PartialStore:
    """Finished samples, appended as JSON lines; a torn last line (a crash mid-write) is ignored."""

    def __init__(self, path: Path):
        self.path, self.records, self._torn = path, {}, False
        if path.is_file():
            text = path.read_text("utf-8", errors="replace")
            self._torn = bool(text) and not text.endswith("\n")  # start the next record on a line of its own
            for rec in appended_records(text):
                try:
                    self.records[(rec["point"], rec["id"], rec["prompt_sha"])] = rec
                except (KeyError, TypeError):
                    continue

    def get(self, point: str, sample_id: str, prompt: str):
        return self.records.get((point, sample_id, record_key(prompt)))

    def add(self, recs: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            if self._torn:
                f.write("\n")
                self._torn = False
            for rec in recs:
                f.write(json.dumps(rec, default=str) + "\n")
                self.records[(rec["point"], rec["id"], rec["prompt_sha"])] = rec
            f.flush()
            os.fsync(f.fileno())


def generate_point(engine: Engine, dcfg: DecodeParams, items: list[dict], point: str, store: PartialStore,
                   score, batch_size: int, label: str, ids_key: str = "ids") -> list[dict]:
    """Per-sample records of one point, in item order; only samples not in `store` are decoded (then stored).

    items: {"id", "prompt" (text), ids_key (its token ids), ...}; score(item, result) -> dict with 'correct'.
    """
    from tqdm import tqdm

    todo = [it for it in items if store.get(point, it["id"], it["prompt"]) is None]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=label, unit="sample", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            t0 = time.perf_counter()
            results = engine.generate_batch([it[ids_key] for it in batch], dcfg)
            share = (time.perf_counter() - t0) / len(batch)  # the batch's wall time, split evenly
            store.add([{"point": point, "id": it["id"], "prompt_sha": record_key(it["prompt"]), "text": r.text,
                        "token_ids": list(r.tokens), "nfe": r.nfe, "seconds": share, "stop_reason": r.stop_reason,
                        "score": score(it, r)} for it, r in zip(batch, results)])
            bar.update(len(batch))
    return [store.get(point, it["id"], it["prompt"]) for it in items]


def summarize(records: list[dict]) -> dict:
    """Accuracy (percent of samples scored correct), TPF and tokens/s over a point's samples."""
    n = len(records)
    tokens = sum(len(r["token_ids"]) for r in records)
    nfe = sum(r["nfe"] for r in records)
    secs = sum(r["seconds"] for r in records)
    return {"accuracy": 100.0 * sum(bool(r["score"]["correct"]) for r in records) / n,
            "tpf": tokens / max(nfe, 1), "tokens_per_s": tokens / max(secs, 1e-9), "nfe": nfe, "nfe_mean": nfe / n,
            "tokens": tokens, "tokens_mean": tokens / n, "seconds": secs}


def fidelity_scorer(parent: ParentLM, ref_by_id: dict | None):
    """Agreement with the parent's answer (itself while the reference is being made) and the parent's NLL of it."""
    from ar2dlm.evaluation.fidelity import completion_nll, sequence_agreement

    def score(item: dict, result) -> dict:
        ref = ref_by_id[item["id"]]["token_ids"] if ref_by_id is not None else list(result.tokens)
        agree = sequence_agreement(ref, result.tokens)
        nll = completion_nll(parent, item["pids"], list(result.tokens))
        return {"correct": agree.exact, "positional": agree.positional, "prefix_tokens": agree.prefix_tokens,
                "prefix_fraction": agree.prefix_fraction, "nll_total": nll.total, "nll_tokens": nll.tokens}

    return score


def build_point(label: str, kind: str, model: str, dlm, value, dcfg: DecodeParams, recs: list[dict],
                ref_recs: list[dict] | None) -> dict:
    """A point of the results file: its settings, summary metrics, per-sample outputs and scores, and with the
    parent's reference answers (`ref_recs`, fidelity) the agreement report."""
    point = {"label": label, "kind": kind, "model": model, "block_size": dlm.config.block_size, "sweep_value": value,
             "decode": asdict(dcfg), **summarize(recs)}
    if ref_recs is not None:
        from ar2dlm.evaluation.fidelity import fidelity_report

        rep = fidelity_report([r["token_ids"] for r in ref_recs], [r["token_ids"] for r in recs])
        total, n = sum(r["score"]["nll_total"] for r in recs), sum(r["score"]["nll_tokens"] for r in recs)
        rep["parent_nll_per_token"] = total / n if n else None
        rep["parent_perplexity"] = math.exp(min(total / n, 700.0)) if n else None
        point["agreement"], point["fidelity"] = point["accuracy"], rep
    point["samples"] = [{"id": r["id"], "text": r["text"], "tokens": len(r["token_ids"]), "nfe": r["nfe"],
                         "tpf": len(r["token_ids"]) / max(r["nfe"], 1), "seconds": r["seconds"],
                         "stop_reason": r["stop_reason"], "score": r["score"],
                         **({"token_ids": r["token_ids"]} if ref_recs is not None else {})} for r in recs]
    return point


def check_context(engine: Engine, items: list[dict], ids_key: str) -> None:
    """Every prompt leaves room for an answer in the model's context window (checked before any decoding)."""
    for it in items:
        if engine.context is not None and len(it[ids_key]) >= engine.context:
            raise Ar2dlmError(f"sample {it['id']}: the prompt has {len(it[ids_key])} tokens, the model's context "
                              f"window is {engine.context}")
