"""`ar2dlm eval`: accuracy (or fidelity to the AR parent) against parallelism, over a sweep of decode settings.

    ar2dlm eval --model runs/dlm/model --task gsm8k --policy threshold --sweep tau=0.5,0.7,0.9,1.0 --baseline-ar

Every sweep point decodes every prompt with the cached engine (batched by --batch-size) and is scored by the task;
`fidelity` scores agreement with the AR parent's greedy answers instead (the parent decoded by the same engine with
policy `ar`, wrapped as a block-size-1 dLM). `--baseline-ar` adds the parent itself as a point (TPF 1).

One results JSON (written atomically) holds the settings, the prompts, every point's metrics and per-sample outputs
and scores, and the AUP over the run's points; a PNG beside it plots accuracy against TPF and tokens/s.

The decoding options are `DecodeParams`' (256 new tokens by default here); `--sweep` sets one of its fields to
each value in turn (`DecodeParams.with_setting`), the other options staying as given. The task's stop strings are
added to any `--stop`.

Resuming: each finished sample is appended to `<output>.partial.jsonl`, keyed by (model, decode settings, task,
sample id, exact prompt text); a rerun skips what is already there. The file goes once the results JSON is written.
The key does not see a model folder's weights change in place: delete the partial file after retraining.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ar2dlm import __version__
from ar2dlm.data.sources import RECORD_SUFFIXES, iter_raw_records
from ar2dlm.data.tokenize import render_chat
from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.engine.params import add_decode_args, decode_params_from_args
from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.agreement import DEFAULT_PROMPTS
from ar2dlm.evaluation.aup import aup
from ar2dlm.evaluation.points import (ParentLM, PartialStore, build_point, check_context, fidelity_scorer,
                                      generate_point, record_key)
from ar2dlm.evaluation.report import plot_run, render_markdown
from ar2dlm.evaluation.tasks import TASKS, Sample, get_task
from ar2dlm.model.loading import resolve_model_source
from ar2dlm.model.open import MODEL_SPEC_HELP, open_for_decoding, parent_spec
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
from ar2dlm.utils.files import check_output_file, write_json

FIDELITY = "fidelity"
SCHEMA = "ar2dlm.eval/1"
DECODE_DEFAULTS = {"max_new_tokens": 256}


@dataclass
class EvalConfig:
    model: str = field(metadata={"help": MODEL_SPEC_HELP})
    task: str = field(metadata={"help": f"{', '.join(TASKS)} or {FIDELITY} (agreement with the AR parent)"})
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
    output: str = field(default="results.json", metadata={"help": "results JSON (the plot goes beside it)"})
    plot: str | None = field(default=None, metadata={"help": "plot PNG (default: the output with .png)"})
    baseline_ar: bool = field(default=False, metadata={"help": "also evaluate the AR parent (policy ar, block 1)"})
    base: str | None = field(default=None, metadata={"help": "AR parent (default: the one the dLM records)"})
    decode: DecodeParams = field(default_factory=lambda: DecodeParams(**DECODE_DEFAULTS), metadata={"cli": False})

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

    def with_stops(self, stop_strings: tuple[str, ...] = ()) -> DecodeParams:
        """The decode settings with the task's stop strings added to the user's."""
        extra = tuple(s for s in stop_strings if s not in self.decode.stop_strings)
        return self.decode.replace(stop_strings=self.decode.stop_strings + extra)

    def points(self, stop_strings: tuple[str, ...] = ()) -> list[tuple[str, object, DecodeParams]]:
        """(label, sweep value, decode settings) of every dLM point."""
        base = self.with_stops(stop_strings)
        key, values = parse_sweep(self.sweep, base)
        if key is None:
            return [(base.policy + (f" tau={base.tau}" if base.tau is not None else ""), None, base)]
        prefix = "" if key == "policy" else f"{base.policy} "
        return [(f"{prefix}{key}={v}", v, base.replace(**{key: v})) for v in values]

    @property
    def partial_path(self) -> Path:
        return Path(f"{self.output}.partial.jsonl")

    @property
    def plot_path(self) -> Path:
        return Path(self.plot) if self.plot else Path(self.output).with_suffix(".png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, EvalConfig)
    add_decode_args(parser, defaults=DECODE_DEFAULTS)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return dataclass_from_args(EvalConfig, args, decode=decode_params_from_args(args))


def parse_sweep(spec: str | None, base: DecodeParams | None = None) -> tuple[str | None, list]:
    """'tau=0.5,0.7' -> ('tau', [0.5, 0.7]); None or '' -> (None, []). Every value is checked on `base` (default
    settings without it): a value the decoder would reject fails here, before anything loads."""
    if spec is None or not spec.strip():
        return None, []
    key, eq, rest = spec.partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not key:
        raise Ar2dlmError(f"malformed --sweep {spec!r}: expected FIELD=V1,V2,... (e.g. tau=0.5,0.7,0.9)")
    texts = [t.strip() for t in rest.split(",")]
    if not texts or any(not t for t in texts):
        raise Ar2dlmError(f"malformed --sweep {spec!r}: empty value")
    base = base or DecodeParams()
    try:
        values = [getattr(base.with_setting(key, t), key) for t in texts]
    except Ar2dlmError as e:
        raise Ar2dlmError(f"--sweep {spec}: {e}") from None
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
            lines = DEFAULT_PROMPTS
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



def _items(cfg: EvalConfig, task, samples: list[Sample], tokenizer) -> list[dict]:
    """One item per sample: its id, the prompt text as rendered, and its token ids for the dLM."""
    items = []
    for s in samples:
        text = prompt_text(task, s, tokenizer, cfg)
        items.append({"id": s.id, "prompt": text, "ids": encode(tokenizer, text, cfg.chat), "sample": s})
    if len({it["id"] for it in items}) != len(items):
        raise Ar2dlmError("the samples' ids are not unique; results could not be told apart")
    return items


# --------------------------------------------------------------------------------------------------- models
@dataclass
class _Parent:
    """The AR parent, decoded by the same engine as a block-size-1 dLM, and its prompts' token ids (item["pids"])."""

    spec: str
    dlm: object
    engine: Engine
    model_id: str  # the spec resolved, for the resume keys


def _open_parent(cfg: EvalConfig, dlm, tokenizer, is_dlm: bool, items: list[dict]) -> _Parent:
    spec = parent_spec(dlm, cfg.base)
    if spec == cfg.model and not is_dlm:
        pdlm, ptok = dlm, tokenizer  # a plain AR model is its own parent
    else:
        pdlm, ptok, _ = open_for_decoding(spec, what="AR parent")
    if pdlm.config.block_size != 1:
        raise Ar2dlmError(f"the AR parent {spec} is a dLM with block size {pdlm.config.block_size}")
    engine = Engine(pdlm, ptok)
    for it in items:
        it["pids"] = encode(ptok, it["prompt"], cfg.chat)
    check_context(engine, items, "pids")
    return _Parent(spec, pdlm, engine, resolve_model_source(spec))


# --------------------------------------------------------------------------------------------------- points
def _fidelity_reference(cfg: EvalConfig, parent: _Parent, items: list[dict], store, stops) -> tuple:
    """(the parent's greedy answers, their point key, the scorer that compares an answer with them)."""
    params = cfg.with_stops(stops).replace(policy="ar", block_parallel=False, temperature=0.0)
    key = record_key({"model": parent.model_id, "decode": asdict(params), "task": "fidelity-reference"})
    recs = generate_point(parent.engine, params, items, key, store, fidelity_scorer(ParentLM(parent.dlm), None),
                          cfg.batch_size, "AR parent (reference)", ids_key="pids")
    return recs, key, fidelity_scorer(ParentLM(parent.dlm), {r["id"]: r for r in recs})


def _baseline_point(cfg: EvalConfig, parent: _Parent, items, store, score, stops, ref_recs, ref_key) -> dict:
    """The parent itself as a point (policy ar, block 1); in a fidelity run with greedy settings that is the
    reference itself."""
    params = cfg.with_stops(stops).replace(policy="ar", block_parallel=False)
    if ref_recs is not None and params.temperature == 0.0:  # the reference's settings exactly
        recs = ref_recs
    else:
        key = record_key({"model": parent.model_id, "decode": asdict(params), "task": cfg.task, "ref": ref_key})
        recs = generate_point(parent.engine, params, items, key, store, score, cfg.batch_size, "AR parent", "pids")
    return build_point("AR parent (ar, block 1)", "ar_baseline", parent.spec, parent.dlm, None, params, recs,
                       ref_recs)


def _results(cfg: EvalConfig, task, items: list[dict], points: list[dict], parent: _Parent | None,
             ref_recs: list[dict] | None) -> dict:
    fidelity = cfg.task == FIDELITY
    sweep_key, sweep_values = parse_sweep(cfg.sweep, cfg.decode)
    results = {
        "schema": SCHEMA, "ar2dlm_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.model, "task": cfg.task, "prompt_task": task.name if fidelity and task else None,
        "base": parent.spec if parent else None, "metric": "exact_match_agreement" if fidelity else "accuracy",
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
    return results


def run(cfg: EvalConfig) -> dict:
    task, samples = load_samples(cfg)
    fidelity = cfg.task == FIDELITY
    dlm, tok, is_dlm = open_for_decoding(cfg.model)
    engine = Engine(dlm, tok)
    items = _items(cfg, task, samples, tok)
    check_context(engine, items, "ids")
    stops = task.stop_sequences(cfg.chat) if task is not None else ()
    parent = _open_parent(cfg, dlm, tok, is_dlm, items) if fidelity or cfg.baseline_ar else None

    store = PartialStore(cfg.partial_path)
    ref_recs = ref_key = None
    if fidelity:
        ref_recs, ref_key, score = _fidelity_reference(cfg, parent, items, store, stops)
    else:
        def score(item: dict, result) -> dict:
            return task.score(item["sample"], result.text)
    points = [_baseline_point(cfg, parent, items, store, score, stops, ref_recs, ref_key)] if cfg.baseline_ar else []
    model_id = resolve_model_source(cfg.model)
    for label, value, params in cfg.points(stops):
        key = record_key({"model": model_id, "decode": asdict(params), "task": cfg.task, "ref": ref_key})
        recs = generate_point(engine, params, items, key, store, score, cfg.batch_size, label)
        points.append(build_point(label, "dlm", cfg.model, dlm, value, params, recs, ref_recs))

    results = _results(cfg, task, items, points, parent, ref_recs)
    plot_run(results, cfg.plot_path)
    write_json(cfg.output, results)
    cfg.partial_path.unlink(missing_ok=True)
    sys.stdout.write(render_markdown([results]))
    print(f"wrote {cfg.output} and {cfg.plot_path}", file=sys.stderr)
    return results
