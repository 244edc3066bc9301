"""`ar2dlm bench-batching`: continuous batching against one request at a time, on the same arrival trace.

Requests (the built-in prompts or a file of them, cycled) arrive at seeded exponential intervals, each with its own
`max_new_tokens` drawn from a range (mixed lengths). The same trace is served twice by the same engine loop: once
with one cache row (`max_running` 1: each request waits for the previous one to finish, a server that does one
request at a time) and once with `--max-running` rows (continuous batching: requests join the running batch at the
next forward and leave it as soon as they finish). Reported per mode: total generated tokens / makespan (first
arrival to last finish), forwards, and every request's latency (arrival to finish) and time to first token; the
outputs of the two modes must be identical (greedy), which the command checks. A PNG shows per-request latencies
and a timeline of each request's waiting and decoding.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field

from ar2dlm.engine import DecodeParams, Engine, encode_prompt
from ar2dlm.engine.params import add_decode_args, decode_params_from_args
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.open import MODEL_SPEC_HELP
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
from ar2dlm.utils.files import check_output_file, write_json


@dataclass
class BatchingBenchConfig:
    model: str = field(metadata={"help": MODEL_SPEC_HELP})
    prompts: str | None = field(default=None, metadata={"help": "file with one prompt per line (default: built-in)"})
    requests: int = field(default=16, metadata={"help": "requests in the trace"})
    mean_interval_ms: float = field(default=300.0, metadata={"help": "mean time between two arrivals"})
    min_new_tokens: int = field(default=16, metadata={"help": "shortest answer length of the trace"})
    max_running: int = field(default=8, metadata={"help": "cache rows of the continuous-batching run"})
    trace_seed: int = field(default=0, metadata={"help": "seed of the trace (arrivals and lengths)"})
    json_out: str | None = field(default=None, metadata={"help": "write the results here"})
    plot_out: str | None = field(default=None, metadata={"help": "write the latency/timeline figure here"})
    decode: DecodeParams = field(default_factory=DecodeParams, metadata={"cli": False})

    def __post_init__(self):
        if self.requests < 1 or self.max_running < 1 or self.min_new_tokens < 1:
            raise Ar2dlmError("--requests, --max-running and --min-new-tokens must be >= 1")
        if not self.mean_interval_ms >= 0:
            raise Ar2dlmError(f"--mean-interval-ms must be >= 0, got {self.mean_interval_ms}")
        check_output_file(self.json_out, "--json-out")
        check_output_file(self.plot_out, "--plot-out")


@dataclass
class TraceItem:
    arrival_s: float
    prompt_ids: list[int]
    params: DecodeParams


def make_trace(prompts: list[list[int]], n: int, mean_interval_s: float, params: DecodeParams, min_new: int,
               seed: int) -> list[TraceItem]:
    """n requests: prompts cycled, exponential inter-arrival gaps, max_new_tokens uniform in [min_new, params']."""
    rng = random.Random(seed)
    t, trace = 0.0, []
    for i in range(n):
        new = rng.randint(min(min_new, params.max_new_tokens), params.max_new_tokens)
        trace.append(TraceItem(t, prompts[i % len(prompts)], params.replace(max_new_tokens=new)))
        t += rng.expovariate(1.0 / mean_interval_s) if mean_interval_s > 0 else 0.0
    return trace


def serve_trace(engine: Engine, trace: list[TraceItem]) -> dict:
    """Replay the trace in real time: add each request when its arrival time has come, step while anything runs,
    sleep until the next arrival otherwise. Returns per-request results and timings (seconds from the start)."""
    pending = sorted(range(len(trace)), key=lambda i: trace[i].arrival_s)
    done: dict[int, dict] = {}
    forwards0, t0 = engine.forwards, time.perf_counter()
    while len(done) < len(trace):
        now = time.perf_counter() - t0
        while pending and trace[pending[0]].arrival_s <= now:
            i = pending.pop(0)
            engine.add_request(trace[i].prompt_ids, trace[i].params, request_id=f"trace-{i}")
        if not engine.has_unfinished():
            time.sleep(max(0.0, trace[pending[0]].arrival_s - now))
            continue
        for out in engine.step():
            if out.finished:
                i = int(out.request_id.split("-")[1])
                end = time.perf_counter() - t0
                res = out.result
                done[i] = {"arrival_s": trace[i].arrival_s, "start_s": end - res.elapsed_s, "end_s": end,
                           "latency_s": end - trace[i].arrival_s,
                           "ttft_s": None if res.ttft_s is None else end - res.elapsed_s + res.ttft_s
                           - trace[i].arrival_s,
                           "tokens": res.tokens, "nfe": res.nfe}
    rows = [done[i] for i in range(len(trace))]
    makespan = max(r["end_s"] for r in rows) - min(r["arrival_s"] for r in rows)
    n_tokens = sum(len(r["tokens"]) for r in rows)
    lat = sorted(r["latency_s"] for r in rows)
    return {"requests": rows, "makespan_s": makespan, "tokens": n_tokens, "tokens_per_s": n_tokens / makespan,
            "forwards": engine.forwards - forwards0, "latency_mean_s": sum(lat) / len(lat),
            "latency_p50_s": lat[len(lat) // 2], "latency_p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, BatchingBenchConfig)
    add_decode_args(parser, defaults={"max_new_tokens": 96})


def config_from_args(args: argparse.Namespace) -> BatchingBenchConfig:
    return dataclass_from_args(BatchingBenchConfig, args, decode=decode_params_from_args(args))


def run(cfg: BatchingBenchConfig) -> dict:
    from ar2dlm.evaluation.agreement import load_prompts
    from ar2dlm.model.open import open_for_decoding

    params = cfg.decode
    prompts = load_prompts(cfg.prompts)
    dlm, tokenizer, _ = open_for_decoding(cfg.model)
    chat = bool(getattr(tokenizer, "chat_template", None))
    ids = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    trace = make_trace(ids, cfg.requests, cfg.mean_interval_ms / 1000, params, cfg.min_new_tokens, cfg.trace_seed)
    Engine(dlm, tokenizer, max_running=1).generate(ids[0], params.replace(max_new_tokens=4))  # warm-up, untimed
    modes = {}
    for name, rows in (("one at a time", 1), (f"continuous, {cfg.max_running} rows", cfg.max_running)):
        print(f"serving {cfg.requests} requests: {name} ...", file=sys.stderr)
        modes[name] = serve_trace(Engine(dlm, tokenizer, max_running=rows), trace)
    first, second = modes.values()
    identical = [a["tokens"] == b["tokens"] for a, b in zip(first["requests"], second["requests"])]
    config = {k: v for k, v in vars(cfg).items() if k != "decode"}
    results = {"model": cfg.model, "decode": params.label, "config": config, "modes": modes,
               "identical_outputs": all(identical), "speedup": second["tokens_per_s"] / first["tokens_per_s"]}
    print(render_table(results))
    if cfg.json_out:
        write_json(cfg.json_out, results)
    if cfg.plot_out:
        plot_batching(results, cfg.plot_out)
    if not all(identical):
        raise Ar2dlmError(f"outputs differ between the modes for {identical.count(False)} request(s)")
    return results


def render_table(results: dict) -> str:
    lines = ["| mode | tokens/s | makespan (s) | forwards | latency mean / p50 / p90 (s) |",
             "| --- | --- | --- | --- | --- |"]
    for name, m in results["modes"].items():
        lines.append(f"| {name} | {m['tokens_per_s']:.1f} | {m['makespan_s']:.1f} | {m['forwards']} | "
                     f"{m['latency_mean_s']:.2f} / {m['latency_p50_s']:.2f} / {m['latency_p90_s']:.2f} |")
    lines.append(f"\nthroughput x{results['speedup']:.2f}; outputs identical: {results['identical_outputs']}")
    return "\n".join(lines)


def plot_batching(results: dict, path: str) -> None:
    """Left: each request's latency in both modes. Right: per mode, each request's wait (light) and run (dark)."""
    from matplotlib.figure import Figure

    from ar2dlm.utils.files import save_figure

    fig = Figure(figsize=(12, 4.5))
    ax_lat, ax_time = fig.subplots(1, 2)
    names = list(results["modes"])
    n = len(results["modes"][names[0]]["requests"])
    width = 0.4
    for k, name in enumerate(names):
        reqs = results["modes"][name]["requests"]
        ax_lat.bar([i + (k - 0.5) * width for i in range(n)], [r["latency_s"] for r in reqs], width, label=name)
        for i, r in enumerate(reqs):
            y = i + (k - 0.5) * width
            ax_time.barh(y, r["start_s"] - r["arrival_s"], width, left=r["arrival_s"], color=f"C{k}", alpha=0.3)
            ax_time.barh(y, r["end_s"] - r["start_s"], width, left=r["start_s"], color=f"C{k}")
    ax_lat.set_xlabel("request (in arrival order)")
    ax_lat.set_ylabel("latency: arrival to last token (s)")
    ax_lat.legend(fontsize=8)
    ax_time.set_xlabel("time (s)")
    ax_time.set_ylabel("request")
    ax_time.invert_yaxis()
    ax_time.set_title("waiting (light) and decoding (dark)", fontsize=9)
    modes = results["modes"]
    fig.suptitle(f"{results['decode']}: " + ", ".join(f"{k} {m['tokens_per_s']:.1f} tokens/s" for k, m in
                                                      modes.items()), fontsize=10)
    save_figure(fig, path)
