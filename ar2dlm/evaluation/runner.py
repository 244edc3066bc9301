"""`ar2dlm eval`: accuracy (or fidelity to the AR parent) against parallelism, over a sweep of decode settings.

    ar2dlm eval --model runs/dlm/model --task gsm8k --policy threshold --sweep tau=0.5,0.7,0.9,1.0 --baseline-ar

Every sweep point decodes every prompt with the cached engine (batched by --batch-size) and is scored by the task;
`fidelity` scores agreement with the AR parent's greedy answers instead (the parent decoded by the same engine with
policy `ar`, wrapped as a block-size-1 dLM). `--baseline-ar` adds the parent itself as a point (TPF 1).

One results JSON (written atomically) holds the settings, the prompts, every point's metrics and per-sample outputs
and scores, and the AUP over the run's points; a PNG beside it plots accuracy against TPF and tokens/s.

Resuming: each finished sample is appended to `<output>.partial.jsonl`, keyed by (model, decode settings, task,
sample id, exact prompt text); a rerun skips what is already there. The file goes once the results JSON is written.
The key does not see a model folder's weights change in place: delete the partial file after retraining.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import types
import typing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ar2dlm import __version__
from ar2dlm.data.sources import RECORD_SUFFIXES, iter_raw_records
from ar2dlm.data.tokenize import render_chat
from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.engine.policies import POLICIES
from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.tasks import TASKS, Sample, get_task
from ar2dlm.utils.files import check_output_file

FIDELITY = "fidelity"
SCHEMA = "ar2dlm.eval/1"
_NOT_SWEEPABLE = ("stop_token_ids", "stop_strings")
_HINTS = typing.get_type_hints(DecodeParams)


@dataclass
class EvalConfig:
    model: str = field(metadata={"help": "dLM folder; a plain AR model (folder, .gguf, embedded name) runs as a "
                                         "block-size-1 dLM"})
    task: str = field(metadata={"help": f"{', '.join(TASKS)} or {FIDELITY} (agreement with the AR parent)"})
    policy: str = field(default="threshold", metadata={"help": f"commit policy: {', '.join(POLICIES)}"})
    sweep: str | None = field(default=None, metadata={"help": "one decode setting over several values, e.g. "
                                                              "tau=0.5,0.7,0.9,1.0 (any decode field)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate the first N samples"})
    batch_size: int = field(default=8, metadata={"help": "prompts decoded together"})
    source: str | None = field(default=None, metadata={"help": "data: .jsonl(.gz) file or hub id (default: the "
                                                               "task's hub dataset); fidelity: a task's file, a task "
                                                               "name, or a text file with one prompt a line"})
    prompt_task: str | None = field(default=None, metadata={"help": "fidelity: whose records --source holds "
                                                                     "(default: guessed from the fields)"})
    fewshot: int = field(default=0, metadata={"help": "few-shot examples in each prompt"})
    fewshot_source: str | None = field(default=None, metadata={"help": "where few-shot examples come from"})
    chat: bool = field(default=True, metadata={"help": "render prompts with the chat template"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens to generate at most"})
    output: str = field(default="results.json", metadata={"help": "results JSON (the plot goes beside it)"})
    plot: str | None = field(default=None, metadata={"help": "plot PNG (default: the output with .png)"})
    baseline_ar: bool = field(default=False, metadata={"help": "also evaluate the AR parent (policy ar, block 1)"})
    base: str | None = field(default=None, metadata={"help": "AR parent (default: the one the dLM records)"})
    tau: float | None = field(default=None, metadata={"help": "threshold: confidence (0.9); entropy: nats (0.5)"})
    steps_per_forward: int = field(default=2, metadata={"help": "tokens per forward of the steps policy"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "sample among the k likeliest tokens (0 = all)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    block_parallel: bool = field(default=False, metadata={"help": "multi-block decoding (several blocks at once)"})
    p_add: float = field(default=0.1, metadata={"help": "open a new block when the last one is this decoded"})
    cache_delay: int = field(default=1, metadata={"help": "forwards before a finished block counts as cached"})
    refresh_every: int = field(default=0, metadata={"help": "recompute the whole cache every N forwards (0: never)"})

    def __post_init__(self):
        self.task = self.task.strip().lower()
        if self.task != FIDELITY and self.task not in TASKS:
            raise Ar2dlmError(f"unknown task {self.task!r} (choose from {', '.join(TASKS)}, {FIDELITY})")
        if self.prompt_task is not None and self.task != FIDELITY:
            raise Ar2dlmError("--prompt-task only applies to --task fidelity")
        if self.batch_size < 1:
            raise Ar2dlmError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise Ar2dlmError(f"--limit must be >= 1, got {self.limit}")
        if self.fewshot < 0:
            raise Ar2dlmError(f"--fewshot must be >= 0, got {self.fewshot}")
        check_output_file(self.output, "--output")
        check_output_file(self.plot_path, "--plot")
        self.points()  # every point's decode settings are valid before anything loads

    def decode(self, stop_strings: tuple[str, ...] = ()) -> DecodeParams:
        return DecodeParams(
            max_new_tokens=self.max_new_tokens, policy=self.policy, tau=self.tau,
            steps_per_forward=self.steps_per_forward, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop_strings=tuple(stop_strings), block_parallel=self.block_parallel,
            p_add=self.p_add, cache_delay=self.cache_delay, refresh_every=self.refresh_every,
        )

    def points(self, stop_strings: tuple[str, ...] = ()) -> list[tuple[str, object, DecodeParams]]:
        """(label, sweep value, decode settings) of every dLM point."""
        base = self.decode(stop_strings)
        key, values = parse_sweep(self.sweep)
        if key is None:
            return [(self.policy + (f" tau={self.tau}" if self.tau is not None else ""), None, base)]
        prefix = "" if key == "policy" else f"{self.policy} "
        try:
            return [(f"{prefix}{key}={v}", v, dataclasses.replace(base, **{key: v})) for v in values]
        except Ar2dlmError as e:
            raise Ar2dlmError(f"--sweep {self.sweep}: {e}") from None

    @property
    def partial_path(self) -> Path:
        return Path(f"{self.output}.partial.jsonl")

    @property
    def plot_path(self) -> Path:
        return Path(self.plot) if self.plot else Path(self.output).with_suffix(".png")


def _convert(key: str, text: str):
    tp = _HINTS[key]
    args = typing.get_args(tp)
    optional = type(None) in args
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in args if a is not type(None))
    if optional and text.lower() == "none":
        return None
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
    else:
        try:
            return tp(text)
        except (TypeError, ValueError):
            pass
    raise Ar2dlmError(f"--sweep {key}: {text!r} is not a valid {tp.__name__}")


def parse_sweep(spec: str | None) -> tuple[str | None, list]:
    """'tau=0.5,0.7' -> ('tau', [0.5, 0.7]); None or '' -> (None, [])."""
    if spec is None or not spec.strip():
        return None, []
    key, eq, rest = spec.partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not key:
        raise Ar2dlmError(f"malformed --sweep {spec!r}: expected FIELD=V1,V2,... (e.g. tau=0.5,0.7,0.9)")
    fields = [f.name for f in dataclasses.fields(DecodeParams) if f.name not in _NOT_SWEEPABLE]
    if key not in fields:
        raise Ar2dlmError(f"--sweep: unknown decode setting {key!r} (choose from {', '.join(fields)})")
    texts = [t.strip() for t in rest.split(",")]
    if not texts or any(not t for t in texts):
        raise Ar2dlmError(f"malformed --sweep {spec!r}: empty value")
    values = [_convert(key, t) for t in texts]
    if len(set(map(repr, values))) != len(values):
        raise Ar2dlmError(f"--sweep {spec!r}: a value is repeated")
    return key, values


# --------------------------------------------------------------------------------------------------- data
def _guess_task(path: Path) -> str:
    records = iter_raw_records(path)
    try:
        where, rec = next(records, (str(path), None))
    finally:
        records.close()
    if rec is None:
        raise Ar2dlmError(f"no samples to evaluate in {path}")
    keys = set(rec) if isinstance(rec, dict) else set()
    for name, needed in (("gsm8k", {"question", "answer"}), ("humaneval", {"entry_point", "test"}),
                         ("mbpp", {"test_list"})):
        if needed <= keys:
            return name
    raise Ar2dlmError(f"{where}: cannot tell which task these records belong to; pass --prompt-task")


def load_samples(cfg: EvalConfig):
    """(task or None, samples). For fidelity without a task, samples are plain prompts (reference '')."""
    opts = {"fewshot_source": cfg.fewshot_source} if cfg.fewshot_source else {}
    task, samples = None, None
    if cfg.task != FIDELITY:
        task = get_task(cfg.task, **opts)
        samples = task.load(cfg.limit, cfg.source)
    elif cfg.prompt_task or (cfg.source and cfg.source.strip().lower() in TASKS):
        task = get_task(cfg.prompt_task or cfg.source, **opts)
        samples = task.load(cfg.limit, None if cfg.prompt_task is None else cfg.source)
    elif cfg.source and cfg.source.lower().endswith(RECORD_SUFFIXES):
        task = get_task(_guess_task(Path(cfg.source).expanduser()), **opts)
        samples = task.load(cfg.limit, cfg.source)
    else:
        if cfg.source is None:
            from ar2dlm.decoding.compare import DEFAULT_PROMPTS as lines
        else:
            try:
                lines = [ln.strip() for ln in Path(cfg.source).expanduser().read_text("utf-8").splitlines()]
            except (OSError, UnicodeDecodeError) as e:
                raise Ar2dlmError(f"cannot read prompts from {cfg.source}: {e}") from None
        lines = [ln for ln in lines if ln][: cfg.limit]
        samples = [Sample(f"prompt/{i}", ln, "") for i, ln in enumerate(lines)]
    if not samples:
        raise Ar2dlmError(f"no samples to evaluate in {cfg.source or 'the default data'}"
                          + (f" (--limit {cfg.limit})" if cfg.limit else ""))
    return task, samples


def prompt_text(task, sample: Sample, tokenizer, cfg: EvalConfig) -> str:
    if task is not None:
        return task.build_prompt(sample, tokenizer, chat=cfg.chat, fewshot=cfg.fewshot)
    return render_chat(tokenizer, [{"role": "user", "content": sample.prompt}]) if cfg.chat else sample.prompt


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """A rendered chat prompt carries its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS)."""
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


# --------------------------------------------------------------------------------------------------- models
def _is_dlm_folder(path: Path) -> bool:
    from ar2dlm.model.dlm import ADAPTER_CONFIG_FILE

    if not path.is_dir():
        return False
    try:
        return (path / ADAPTER_CONFIG_FILE).exists() or "dlm" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_model(spec: str, what: str = "model"):
    """(dLM, tokenizer, is_dlm): a dLM folder, or an AR model wrapped as a block-size-1 dLM."""
    from ar2dlm.decoding.generate import load_for_decoding
    from ar2dlm.model.loading import EMBEDDED_MODELS

    p = Path(spec).expanduser()
    local = spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or ("/" in spec and
                                                                       Path(spec.split("/")[0]).is_dir())
    if spec not in EMBEDDED_MODELS and not p.exists() and local:
        raise Ar2dlmError(f"{what} not found: {spec}")
    dlm, tokenizer = load_for_decoding(spec)
    return dlm.eval(), tokenizer, _is_dlm_folder(p)


class ParentLM(torch.nn.Module):
    """The AR parent as `completion_nll` wants it (`model(ids).logits`), via its block-size-1 wrapper."""

    def __init__(self, dlm):
        super().__init__()
        self.dlm = dlm
        self.config = dlm.hf_config

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.dlm(input_ids, use_cache=False)[0])


# --------------------------------------------------------------------------------------------------- resume
def _sha(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()[:16]


class PartialStore:
    """Finished samples, appended as JSON lines; a torn last line (a crash mid-write) is ignored."""

    def __init__(self, path: Path):
        self.path, self.records, self._torn = path, {}, False
        if path.is_file():
            text = path.read_text("utf-8", errors="replace")
            self._torn = bool(text) and not text.endswith("\n")  # start the next record on a line of its own
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                    self.records[(rec["point"], rec["id"], rec["prompt_sha"])] = rec
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, point: str, sample_id: str, prompt: str):
        return self.records.get((point, sample_id, _sha(prompt)))

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
            store.add([{"point": point, "id": it["id"], "prompt_sha": _sha(it["prompt"]), "text": r.text,
                        "token_ids": list(r.tokens), "nfe": r.nfe, "seconds": share, "stop_reason": r.stop_reason,
                        "score": score(it, r)} for it, r in zip(batch, results)])
            bar.update(len(batch))
    return [store.get(point, it["id"], it["prompt"]) for it in items]


def summarize(records: list[dict]) -> dict:
    n = len(records)
    tokens = sum(len(r["token_ids"]) for r in records)
    nfe = sum(r["nfe"] for r in records)
    secs = sum(r["seconds"] for r in records)
    return {"accuracy": 100.0 * sum(bool(r["score"]["correct"]) for r in records) / n,
            "tpf": tokens / max(nfe, 1), "tokens_per_s": tokens / max(secs, 1e-9), "nfe": nfe, "nfe_mean": nfe / n,
            "tokens": tokens, "tokens_mean": tokens / n, "seconds": secs}


def _fidelity_score(parent: ParentLM, ref_by_id: dict | None):
    """Agreement with the parent's answer (itself while the reference is being made) and the parent's NLL of it."""
    from ar2dlm.evaluation.fidelity import completion_nll, sequence_agreement

    def score(item: dict, result) -> dict:
        ref = ref_by_id[item["id"]]["token_ids"] if ref_by_id is not None else list(result.tokens)
        agree = sequence_agreement(ref, result.tokens)
        nll = completion_nll(parent, item["pids"], list(result.tokens))
        return {"correct": agree.exact, "positional": agree.positional, "prefix_tokens": agree.prefix_tokens,
                "prefix_fraction": agree.prefix_fraction, "nll_total": nll.total, "nll_tokens": nll.tokens}

    return score


def _point(label: str, kind: str, model: str, dlm, value, dcfg: DecodeParams, recs: list[dict],
           ref_recs: list[dict] | None) -> dict:
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


def _check_context(engine: Engine, items: list[dict], ids_key: str) -> None:
    for it in items:
        if engine.context is not None and len(it[ids_key]) >= engine.context:
            raise Ar2dlmError(f"sample {it['id']}: the prompt has {len(it[ids_key])} tokens, the model's context "
                              f"window is {engine.context}")


def run_eval(cfg: EvalConfig) -> dict:
    from ar2dlm.evaluation.aup import aup
    from ar2dlm.evaluation.report import plot_run
    from ar2dlm.model.loading import resolve_model_source
    from ar2dlm.utils.files import write_json

    task, samples = load_samples(cfg)
    fidelity = cfg.task == FIDELITY
    dlm, tok, is_dlm = load_model(cfg.model)
    engine = Engine(dlm, tok)
    items = []
    for s in samples:
        text = prompt_text(task, s, tok, cfg)
        items.append({"id": s.id, "prompt": text, "ids": encode(tok, text, cfg.chat), "sample": s})
    _check_context(engine, items, "ids")
    if len({it["id"] for it in items}) != len(items):
        raise Ar2dlmError("the samples' ids are not unique; results could not be told apart")
    stops = task.stop_sequences(cfg.chat) if task is not None else ()

    parent_spec = pengine = None
    if fidelity or cfg.baseline_ar:
        parent_spec = cfg.base or dlm.config.base_model or (None if is_dlm else cfg.model)
        if parent_spec is None:
            raise Ar2dlmError("the dLM does not record its AR parent: pass --base")
        if parent_spec == cfg.model and not is_dlm:
            pdlm, ptok = dlm, tok  # a plain AR model is its own parent
        else:
            pdlm, ptok, _ = load_model(parent_spec, "AR parent")
        if pdlm.config.block_size != 1:
            raise Ar2dlmError(f"the AR parent {parent_spec} is a dLM with block size {pdlm.config.block_size}")
        pengine = Engine(pdlm, ptok)
        for it in items:
            it["pids"] = encode(ptok, it["prompt"], cfg.chat)
        _check_context(pengine, items, "pids")
        parent_id = resolve_model_source(parent_spec)

    store = PartialStore(cfg.partial_path)
    model_id = resolve_model_source(cfg.model)
    points, ref_recs, ref_key = [], None, None
    if fidelity:
        ref_dcfg = dataclasses.replace(cfg.decode(stops), policy="ar", block_parallel=False, temperature=0.0)
        ref_key = _sha({"model": parent_id, "decode": asdict(ref_dcfg), "task": "fidelity-reference"})
        ref_recs = generate_point(pengine, ref_dcfg, items, ref_key, store, _fidelity_score(ParentLM(pdlm), None),
                                  cfg.batch_size, "AR parent (reference)", ids_key="pids")
        score = _fidelity_score(ParentLM(pdlm), {r["id"]: r for r in ref_recs})
    else:
        def score(item: dict, result) -> dict:
            return task.score(item["sample"], result.text)

    if cfg.baseline_ar:
        bcfg = dataclasses.replace(cfg.decode(stops), policy="ar", block_parallel=False)
        if fidelity and bcfg == ref_dcfg:
            recs = ref_recs
        else:
            key = _sha({"model": parent_id, "decode": asdict(bcfg), "task": cfg.task, "ref": ref_key})
            recs = generate_point(pengine, bcfg, items, key, store, score, cfg.batch_size, "AR parent", "pids")
        points.append(_point("AR parent (ar, block 1)", "ar_baseline", parent_spec, pdlm, None, bcfg, recs, ref_recs))
    for label, value, dcfg in cfg.points(stops):
        key = _sha({"model": model_id, "decode": asdict(dcfg), "task": cfg.task, "ref": ref_key})
        recs = generate_point(engine, dcfg, items, key, store, score, cfg.batch_size, label)
        points.append(_point(label, "dlm", cfg.model, dlm, value, dcfg, recs, ref_recs))

    sweep_key, sweep_values = parse_sweep(cfg.sweep)
    results = {
        "schema": SCHEMA, "ar2dlm_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.model, "task": cfg.task, "prompt_task": task.name if fidelity and task else None,
        "base": parent_spec, "metric": "exact_match_agreement" if fidelity else "accuracy",
        "sweep": {"key": sweep_key, "values": sweep_values} if sweep_key else None, "settings": asdict(cfg),
        "num_samples": len(items),
        "prompts": [{"id": it["id"], "prompt": it["prompt"], "question": it["sample"].prompt,
                     "reference": it["sample"].reference} for it in items],
        "points": points, "aup": aup([(p["tpf"], p["accuracy"]) for p in points]),
        "plot": str(cfg.plot_path),
    }
    if fidelity:
        results["parent_outputs"] = [{"id": r["id"], "text": r["text"], "token_ids": r["token_ids"]}
                                     for r in ref_recs]
    plot_run(results, cfg.plot_path)
    write_json(cfg.output, results)
    cfg.partial_path.unlink(missing_ok=True)
    return results
