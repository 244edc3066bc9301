"""Decoding speed: a dLM's commit policies against its AR parent, on the same prompts, in one process.

Methods, each run at every batch size over the same prompt token ids (chat template applied when the tokenizer has one):
  * `hf-generate`: Hugging Face `generate`, greedy, on the AR parent (the plain AR baseline);
  * `ar-engine`: our cached engine with the `ar` policy on the AR parent wrapped as a block-size-1 dLM (the same
    model, and the same decoding loop as the dLM policies, one token a forward);
  * every dLM policy spec (`threshold:0.9`, `entropy:0.5`, `steps:2` = 2 tokens a forward, `ar`, `verify:3` = 3
    drafts checked a forward), optionally also with multi-block decoding (`+bp`).

Batch size 1 decodes the prompts one at a time; batch size N decodes them in consecutive groups of N (HF generate with
left padding and an attention mask, the engine with `generate_batch`). Before the timed pass every method decodes the
first group `warmup` times, untimed; the timed pass then interleaves the methods group by group (rotating which goes
first) so that machine noise and drifting clocks hit them alike. Wall time is measured around each call with
`time.perf_counter` (prompts are tokenized beforehand, so it is decoding only).

Counts:
  * calls: batched forward passes of the model (HF generate: counted by a hook on it, one per generated position of
    the batch, prefill included; our engine: the model calls it made);
  * NFE: forward passes summed over the sequences, a sequence counting only until it has stopped (engine: each
    result's own count, the denoising steps of the reference decoder; a step with nothing to feed, whose one masked
    position reads a stored logit, makes no model call, so a dLM may show fewer calls than NFE at batch size 1;
    HF generate: measured by the same hook, which watches the fed tokens for each row's stop);
  * TPF = generated tokens / NFE (an AR decoder has TPF 1 by construction; here it is measured).
Agreement is against the AR parent's greedy answers (HF generate, batch size 1): the share of prompts whose answer
tokens are exactly equal, and the mean leading agreement (common prefix / longer answer).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ar2dlm.engine import DecodeParams, Engine, default_stop_ids, encode_prompt
from ar2dlm.engine.params import add_decode_args, decode_params_from_args
from ar2dlm.engine.policies import DEFAULT_TAU
from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.agreement import leading_agreement, load_prompts, trim_at_stop
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
from ar2dlm.utils.devices import resolve_device
from ar2dlm.utils.files import check_output_file, write_json

HF_METHOD = "hf-generate"
AR_METHOD = "ar-engine"
LOOKUP_METHOD = "hf-prompt-lookup"


# ------------------------------------------------------------------------------------------------- policy specs
def parse_policy_specs(text: str, block_parallel_too: bool = False,
                       base: DecodeParams | None = None) -> list[DecodeParams]:
    """Comma-separated `DecodeParams.from_spec` specs (`threshold:0.9`, `entropy:0.5`, `steps:2`, `ar`, a `+bp`
    suffix for multi-block), duplicates dropped; with `block_parallel_too` each block-diffusion spec also runs
    multi-block.
    `base` gives the other decoding fields (length, multi-block knobs)."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise Ar2dlmError("--policies is empty (e.g. threshold:0.9,entropy:0.5,steps:2)")
    fields = {} if base is None else {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    specs = list(dict.fromkeys(DecodeParams.from_spec(p, **fields) for p in parts))
    if block_parallel_too:
        specs += [s.replace(block_parallel=True) for s in list(specs) if s.policy not in ("ar", "verify")]
    return list(dict.fromkeys(specs))


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise Ar2dlmError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise Ar2dlmError(f"--batch-sizes must be integers >= 1, got {text!r}")
    return list(dict.fromkeys(sizes))


# ------------------------------------------------------------------------------------------------------ config
DECODE_DEFAULTS = {"max_new_tokens": 128}
DLM_POLICIES = "threshold:0.9,threshold:0.7,entropy:0.5"
DRAFTER_POLICIES = "verify,verify:auto+lookup,verify:auto+all,threshold:0.9"
# a feature drafter has no mask block (+all) and is not a dLM (threshold): its chain, its tree, its default decoding
FEATURE_DRAFTER_POLICIES = "verify,verify+tree,verify:auto+lookup+tree"
# The specs set the policy; every method decodes greedily, as HF generate does, so agreement means something.
DECODE_SKIP = ("policy", "tau", "steps_per_forward", "draft_len", "block_parallel", "temperature", "top_p", "top_k",
               "seed", "stop_strings")


@dataclass
class DecodeBenchConfig:
    model: str = field(metadata={"help": "converted dLM folder, or a shipped dLM's name (smollm2-135m-dlm)"})
    base: str | None = field(default=None, metadata={"help": "AR parent (default: the one recorded in the dLM)"})
    prompts: str | None = field(default=None, metadata={"help": "file with one prompt per line (default: built-in)"})
    policies: str | None = field(default=None, metadata={
        "help": "comma-separated dLM decoding specs: threshold:TAU, entropy:NATS, steps:K (K tokens a forward), ar, "
                "verify:DRAFTS (or verify:auto); a +bp suffix decodes multi-block, +all drafts for every acceptance "
                f"length, +lookup fills missing drafts by prompt lookup (default: {DRAFTER_POLICIES} for a gated drafter, "
                f"{FEATURE_DRAFTER_POLICIES} for a feature drafter, else {DLM_POLICIES})"})
    batch_sizes: str = field(default="1,8", metadata={"help": "comma-separated batch sizes (1 = one prompt at a time)"})
    block_parallel_too: bool = field(default=False, metadata={"help": "also run each policy with multi-block decoding"})
    prompt_lookup: int = field(default=10, metadata={
        "help": f"tokens a draft of HF prompt-lookup decoding on the parent ({LOOKUP_METHOD}, batch 1 only; 0: off)"})
    warmup: int = field(default=1, metadata={"help": "untimed calls per method and batch size (on the first group)"})
    device: str = field(default="auto", metadata={"help": "device", "choices": ["auto", "cpu", "cuda"]})
    json_out: str | None = field(default=None, metadata={"help": "also write the results here"})
    plot_out: str | None = field(default=None, metadata={"help": "also draw tokens/s per method and batch size (PNG)"})
    decode: DecodeParams = field(default_factory=lambda: DecodeParams(**DECODE_DEFAULTS), metadata={"cli": False})

    def __post_init__(self):
        if self.warmup < 0:
            raise Ar2dlmError(f"--warmup must be >= 0, got {self.warmup}")
        if self.prompt_lookup < 0:
            raise Ar2dlmError(f"--prompt-lookup must be >= 0, got {self.prompt_lookup}")
        self.policy_specs()
        self.batch_size_list()
        check_output_file(self.json_out, "--json-out")
        check_output_file(self.plot_out, "--plot-out")

    def policy_specs(self, drafter: bool = False, feature: bool = False) -> list[DecodeParams]:
        """The specs to run; without --policies, the default for the model (a drafter's include verify)."""
        default = FEATURE_DRAFTER_POLICIES if feature else DRAFTER_POLICIES if drafter else DLM_POLICIES
        return parse_policy_specs(self.policies or default, self.block_parallel_too, self.decode)

    def batch_size_list(self) -> list[int]:
        return parse_batch_sizes(self.batch_sizes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, DecodeBenchConfig)
    add_decode_args(parser, defaults=DECODE_DEFAULTS, skip=DECODE_SKIP)


def config_from_args(args: argparse.Namespace) -> DecodeBenchConfig:
    return dataclass_from_args(DecodeBenchConfig, args, decode=decode_params_from_args(args))


# ----------------------------------------------------------------------------------------------------- methods
class _CallCounter:
    """Counts the forward calls of a module and, when given the stop ids, each row's calls until it has stopped.

    A row counts in the first call of a generate (prefill) and in every later call until a stop token has been fed
    to it: HF generate feeds each step the tokens produced the step before, so a row that has stopped is still in
    the batch (fed padding) but no longer counts.
    """

    def __init__(self, module: torch.nn.Module, stop_ids: tuple[int, ...] | None = None):
        self.calls = 0
        self.rows: torch.Tensor | None = None  # per-row calls of the current generate
        self._done: torch.Tensor | None = None
        self._stops = torch.tensor(stop_ids, dtype=torch.long) if stop_ids is not None else None
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def start(self) -> None:
        """Call before each generate: a new batch of rows."""
        self.rows = self._done = None

    def _hook(self, module, args, kwargs):
        self.calls += 1
        if self._stops is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise Ar2dlmError("cannot count forwards per row: the model was called without input_ids")
        if self._done is None:
            self._done = torch.zeros(ids.shape[0], dtype=torch.bool)
            self.rows = torch.zeros(ids.shape[0], dtype=torch.long)
        else:
            self._done |= torch.isin(ids[:, -1].cpu(), self._stops)
        self.rows += (~self._done).long()


@dataclass
class _Method:
    name: str
    kind: str  # "hf" | "engine"
    run: Callable[[list[list[int]]], list[tuple[list[int], int]]]  # group -> [(answer tokens, NFE)]
    calls: Callable[[], int]
    spec: DecodeParams | None = None
    model: str = ""


def _hf_method(parent, stop_ids: tuple[int, ...], pad_id: int, max_new_tokens: int, device,
               model: str, counter: _CallCounter, prompt_lookup: int = 0) -> _Method:
    """HF `generate` on the parent, greedy; with `prompt_lookup` > 0, its assisted generation with prompt-lookup
    drafts of that many tokens (n-grams of the prompt), the speculative decoding a user gets for free. `counter`
    counts the parent's calls (one counter per model: both HF methods share it)."""
    extra = {"prompt_lookup_num_tokens": prompt_lookup} if prompt_lookup else {}

    def run(group: list[list[int]]) -> list[tuple[list[int], int]]:
        width = max(len(ids) for ids in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(group), width), dtype=torch.long)
        for i, ids in enumerate(group):  # left padding
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        counter.start()
        out = parent.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
            no_repeat_ngram_size=0, min_new_tokens=0, eos_token_id=list(stop_ids), pad_token_id=pad_id, **extra)
        answers = [trim_at_stop(row, stop_ids) for row in out[:, width:].tolist()]
        return list(zip(answers, counter.rows.tolist()))

    return _Method(LOOKUP_METHOD if prompt_lookup else HF_METHOD, "hf", run, lambda: counter.calls, None, model)


def _engine_method(name: str, dlm, tokenizer, dcfg: DecodeParams, spec: DecodeParams | None,
                   model: str) -> _Method:
    """Our engine on `dlm`; its calls are the model calls the engine made (`Engine.forwards`), whichever decoder
    forward ran them."""
    engine = Engine(dlm, tokenizer)

    def run(group: list[list[int]]) -> list[tuple[list[int], int]]:
        return [(r.tokens, r.nfe) for r in engine.generate_batch(group, dcfg)]

    return _Method(name, "engine", run, lambda: engine.forwards, spec, model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pass(methods: list[_Method], groups: list[list[list[int]]], warmup: int, device: torch.device) -> dict:
    """Warm every method up on the first group, then time them group by group in rotating order."""
    for m in methods:
        for _ in range(warmup):
            m.run(groups[0])
    out = {m.name: {"answers": [], "nfe": [], "wall_s": 0.0, "calls": 0} for m in methods}
    for g, group in enumerate(groups):
        for j in range(len(methods)):
            m = methods[(g + j) % len(methods)]
            calls0 = m.calls()
            _sync(device)
            t0 = time.perf_counter()
            res = m.run(group)
            _sync(device)
            out[m.name]["wall_s"] += time.perf_counter() - t0
            out[m.name]["calls"] += m.calls() - calls0
            out[m.name]["answers"] += [toks for toks, _ in res]
            out[m.name]["nfe"] += [nfe for _, nfe in res]
    return out


# --------------------------------------------------------------------------------------------------------- run
class _Models(NamedTuple):
    dlm: Any
    tok: Any
    parent: Any  # the AR parent, for HF generate
    parent_tok: Any
    wrapped: Any  # a second copy of the parent, as a block-size-1 dLM for our engine
    wrapped_tok: Any
    base_name: str


def _load_models(cfg: DecodeBenchConfig, device: torch.device) -> _Models:
    """The dLM, the AR parent for HF generate, and a second copy of the parent wrapped as a block-size-1 dLM for our
    engine (wrapping adds the mask token's row, which must not touch HF generate's model)."""
    from ar2dlm.model.loading import load_base, resolve_dlm_path
    from ar2dlm.model.open import check_not_run_folder, load_dlm, open_for_decoding, parent_spec

    path = resolve_dlm_path(cfg.model)
    if not path.is_dir():
        raise Ar2dlmError(f"no dLM folder at {cfg.model}")
    check_not_run_folder(cfg.model)
    dlm, tokenizer = load_dlm(path, device=device)
    base_name = parent_spec(dlm, cfg.base)
    parent, parent_tok = load_base(base_name, device=device)
    wrapped, wrapped_tok, _ = open_for_decoding(base_name, device=device, what="AR parent")
    return _Models(dlm.eval(), tokenizer, parent.eval(), parent_tok, wrapped, wrapped_tok, base_name)


def _prompt_ids(prompts: list[str], tok, parent, parent_tok, max_new_tokens: int) -> list[list[int]]:
    """The prompts as token ids (chat template when there is one), the same for the dLM and its parent, and short
    enough to leave room for the answers in the parent's context window."""
    from ar2dlm.model.open import context_length

    prompt_ids = [encode_prompt(tok, p, chat=bool(getattr(tok, "chat_template", None))) for p in prompts]
    for p, ids in zip(prompts, prompt_ids):
        if encode_prompt(parent_tok, p, chat=bool(getattr(parent_tok, "chat_template", None))) != ids:
            raise Ar2dlmError(f"the dLM and its AR parent tokenize the prompt {p[:40]!r} differently")
    context = context_length(parent)
    longest = max(len(ids) for ids in prompt_ids)
    if context is not None and longest + max_new_tokens > context:
        raise Ar2dlmError(f"the longest prompt ({longest} tokens) + --max-new-tokens {max_new_tokens} exceeds "
                          f"the context window ({context}); use shorter prompts or a smaller --max-new-tokens")
    return prompt_ids


def _row(m: _Method, bs: int, r: dict, reference: list[list[int]], tok) -> dict:
    """One method at one batch size: its totals, measured TPF and agreement with the parent's greedy answers."""
    answers, nfe = r["answers"], sum(r["nfe"])
    n_tok = sum(len(a) for a in answers)
    exact = [a == ref for a, ref in zip(answers, reference)]
    lead = [leading_agreement(a, ref) for a, ref in zip(answers, reference)]
    spec = m.spec
    return {
        "method": m.name, "kind": m.kind, "on": "AR" if spec is None else "dLM", "model": m.model,
        "policy": spec.policy if spec else ("ar" if m.kind == "engine" else m.name),
        "tau": spec.make_policy().tau if spec and spec.policy in DEFAULT_TAU else None,
        "steps_per_forward": spec.steps_per_forward if spec and spec.policy == "steps" else None,
        "draft_len": spec.draft_len if spec and spec.policy == "verify" else None,
        "block_parallel": bool(spec and spec.block_parallel), "batch_size": bs,
        "tokens": n_tok, "wall_s": r["wall_s"], "tokens_per_s": n_tok / r["wall_s"] if r["wall_s"] else 0.0,
        "calls": r["calls"], "nfe": nfe, "tpf": n_tok / nfe if nfe else 0.0,
        "exact_agreement": sum(exact) / len(exact), "leading_agreement": sum(lead) / len(lead),
        "per_prompt": [{"tokens": len(a), "nfe": n, "exact": e, "leading": ld,
                        "text": tok.decode(a, skip_special_tokens=True)}
                       for a, n, e, ld in zip(answers, r["nfe"], exact, lead)],
    }


def _add_speed_ratios(rows: list[dict]) -> None:
    """Each row's tokens/s as a multiple of HF generate's and of our ar's at the same batch size."""
    for row in rows:
        same = {r["method"]: r for r in rows if r["batch_size"] == row["batch_size"]}
        for key, name in (("vs_hf", HF_METHOD), ("vs_ar", AR_METHOD)):
            base = same[name]["tokens_per_s"]
            row[key] = row["tokens_per_s"] / base if base else None


def _build_methods(cfg: DecodeBenchConfig, specs: list[DecodeParams], models: _Models,
                   device: torch.device) -> tuple[list[_Method], list[_Method]]:
    """The methods timed at every batch size (HF generate, our ar on the parent, each dLM spec) and those timed at
    batch size 1 only (HF prompt lookup, when asked for)."""
    dlm, tok, parent, parent_tok, wrapped, wrapped_tok, base_name = models
    max_new = cfg.decode.max_new_tokens
    stops = default_stop_ids(tok)
    pad_id = next(i for i in (parent_tok.pad_token_id, parent_tok.eos_token_id, *stops) if isinstance(i, int))

    ar_params = cfg.decode.replace(policy="ar", stop_token_ids=stops)
    parent_calls = _CallCounter(parent, stops)
    methods = [_hf_method(parent, stops, pad_id, max_new, device, base_name, parent_calls),
               _engine_method(AR_METHOD, wrapped, wrapped_tok, ar_params, None, base_name)]
    methods += [_engine_method(s.label, dlm, tok, s.replace(stop_token_ids=stops), s, cfg.model) for s in specs]

    lookup = [_hf_method(parent, stops, pad_id, max_new, device, base_name, parent_calls, cfg.prompt_lookup)] \
        if cfg.prompt_lookup else []
    return methods, lookup


def _time_batch_sizes(methods: list[_Method], lookup: list[_Method], prompt_ids: list[list[int]],
                      batch_sizes: list[int], warmup: int, device: torch.device) -> dict[int, dict]:
    """One timed pass per batch size (see `_time_pass`), its duration reported on stderr."""
    passes: dict[int, dict] = {}
    for bs in batch_sizes:
        groups = [prompt_ids[i:i + bs] for i in range(0, len(prompt_ids), bs)]
        timed = methods + (lookup if bs == 1 else [])  # HF assisted generation takes one sequence at a time
        t0 = time.perf_counter()
        passes[bs] = _time_pass(timed, groups, warmup, device)
        print(f"batch {bs}: {len(prompt_ids)} prompts in {len(groups)} group(s), {len(timed)} methods, "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return passes


def run(cfg: DecodeBenchConfig) -> dict:
    batch_sizes = cfg.batch_size_list()
    prompts = load_prompts(cfg.prompts)
    device = resolve_device(cfg.device)
    models = _load_models(cfg, device)
    specs = cfg.policy_specs(drafter=models.dlm.config.drafter,
                             feature=getattr(models.dlm, "drafts_from_features", False))
    prompt_ids = _prompt_ids(prompts, models.tok, models.parent, models.parent_tok, cfg.decode.max_new_tokens)
    methods, lookup = _build_methods(cfg, specs, models, device)
    passes = _time_batch_sizes(methods, lookup, prompt_ids, batch_sizes, cfg.warmup, device)
    if 1 in passes:
        reference = passes[1][HF_METHOD]["answers"]
    else:  # the parent's own greedy answers, one prompt at a time (untimed)
        reference = [methods[0].run([ids])[0][0] for ids in prompt_ids]
    rows = [_row(m, bs, passes[bs][m.name], reference, models.tok) for bs in batch_sizes for m in methods + lookup
            if m.name in passes[bs]]
    _add_speed_ratios(rows)

    result = {
        "config": asdict(cfg), "model": cfg.model, "base": models.base_name, "block_size": models.dlm.config.block_size,
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "prompts": prompts,
        "prompt_tokens": [len(ids) for ids in prompt_ids], "methods": [m.name for m in methods + lookup],
        "rows": rows,
    }
    _report(cfg, result)
    return result


def _report(cfg: DecodeBenchConfig, result: dict) -> None:
    """The table on stdout; the JSON and the plot where asked for, and a note on stderr naming what was written."""
    print(format_table(result))
    if cfg.json_out:
        write_json(cfg.json_out, result)
    if cfg.plot_out:
        plot_decode_bench(result, cfg.plot_out)
    written = [p for p in (cfg.json_out, cfg.plot_out) if p]
    if written:
        print(f"wrote {' and '.join(written)}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------------ output
def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"dLM {result['model']} (block {result['block_size']}) vs AR parent {result['base']}",
        f"{len(result['prompts'])} prompts, <= {cfg['decode']['max_new_tokens']} new tokens, {result['device']}, "
        f"{result['threads']} thread(s), warmup {cfg['warmup']}; agreement vs {HF_METHOD} at batch 1",
        f"{'batch':>5}  {'on':<4}{'method':<20}{'tokens':>7}{'wall s':>9}{'tok/s':>9}{'calls':>7}{'NFE':>7}{'TPF':>6}"
        f"{'x HF':>7}{'x ar':>7}{'exact':>7}{'lead':>6}",
    ]
    last = None
    for r in result["rows"]:
        if last is not None and r["batch_size"] != last:
            lines.append("")
        last = r["batch_size"]
        vs_hf, vs_ar = (f"{v:.2f}" if v is not None else "-" for v in (r["vs_hf"], r["vs_ar"]))
        lines.append(
            f"{r['batch_size']:>5}  {r['on']:<4}{r['method']:<20}{r['tokens']:>7}{r['wall_s']:>9.2f}"
            f"{r['tokens_per_s']:>9.1f}{r['calls']:>7}{r['nfe']:>7}{r['tpf']:>6.2f}{vs_hf:>7}{vs_ar:>7}"
            f"{r['exact_agreement']:>7.0%}{r['leading_agreement']:>6.0%}")
    return "\n".join(lines)


def plot_decode_bench(result: dict, path: str | Path) -> None:
    """Grouped bars: tokens/s per method (groups) and batch size (bars), each bar annotated with its TPF."""
    from matplotlib.figure import Figure

    from ar2dlm.utils.files import save_figure

    methods = result["methods"]
    sizes = sorted({r["batch_size"] for r in result["rows"]})
    by_key = {(r["method"], r["batch_size"]): r for r in result["rows"]}
    fig = Figure(figsize=(max(6.0, 1.1 * len(methods) * max(1, len(sizes)) ** 0.5 + 2), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(sizes)
    top = max(r["tokens_per_s"] for r in result["rows"]) or 1.0
    for j, bs in enumerate(sizes):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(methods))]
        present = [(x, m) for x, m in zip(xs, methods) if (m, bs) in by_key]  # prompt lookup: batch 1 only
        bars = ax.bar([x for x, _ in present], [by_key[(m, bs)]["tokens_per_s"] for _, m in present], width,
                      label=f"batch {bs}", color=f"C{j}")
        for bar, (_, m) in zip(bars, present):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01 * top,
                    f"TPF {by_key[(m, bs)]['tpf']:.2f}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(methods)))
    on = {r["method"]: r["on"] for r in result["rows"]}
    ax.set_xticklabels([f"{m} ({on[m]})" if on[m] == "AR" else m for m in methods], rotation=30, ha="right",
                       fontsize=8)
    ax.set_ylabel("generated tokens/s")
    ax.set_ylim(0, top * 1.25)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{Path(str(result['model'])).name} (block {result['block_size']}) vs {Path(str(result['base'])).name}"
                 f": {len(result['prompts'])} prompts, {result['device']}, {result['threads']} thread(s)", fontsize=9)
    save_figure(fig, path)
