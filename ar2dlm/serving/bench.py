"""A load generator for an OpenAI-compatible server: streamed requests from `concurrency` client threads, each
sending its next request as soon as its last one ended (a closed loop), for a fixed number of requests or a time.

Measured per request on the client: latency (send to last byte), time to first token (send to the first chunk that
carries tokens), completion tokens (the stream's usage chunk), and errors; per level: throughput (completion tokens /
wall time), requests/s, p50/p99 of latency and TTFT.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass


@dataclass
class RequestRecord:
    ok: bool
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class LoadSpec:
    model: str
    prompts: list[str]
    max_tokens: int
    decoding: dict  # the `ar2dlm` body field ({} for the server's defaults)
    raw: bool = False  # /v1/completions on the bare text instead of a chat turn


def one_request(client, spec: LoadSpec, prompt: str) -> RequestRecord:
    """One streamed request; any failure is recorded, never raised (a load test counts errors)."""
    extra = {"extra_body": {"ar2dlm": spec.decoding}} if spec.decoding else {}
    common = dict(model=spec.model, max_tokens=spec.max_tokens, stream=True,
                  stream_options={"include_usage": True}, **extra)
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        if spec.raw:
            stream = client.completions.create(prompt=prompt, **common)
        else:
            stream = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
        for chunk in stream:
            if ttft is None and (chunk.model_extra or {}).get("ar2dlm", {}).get("tokens"):
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # noqa: BLE001 - an error is a measurement here
        return RequestRecord(False, time.perf_counter() - t0, ttft, tokens, f"{type(e).__name__}: {e}")
    return RequestRecord(True, time.perf_counter() - t0, ttft, tokens)


def run_level(client, spec: LoadSpec, concurrency: int, requests: int | None = None,
              duration_s: float | None = None) -> dict:
    """`concurrency` threads in a closed loop until `requests` were sent or `duration_s` has passed."""
    if (requests is None) == (duration_s is None):
        raise ValueError("give exactly one of requests and duration_s")
    counter, lock = itertools.count(), threading.Lock()
    t0 = time.perf_counter()
    records: list[RequestRecord] = []

    def next_index() -> int | None:
        with lock:
            i = next(counter)
        over = i >= requests if requests is not None else time.perf_counter() - t0 >= duration_s
        return None if over else i

    def client_loop() -> None:
        while (i := next_index()) is not None:
            record = one_request(client, spec, spec.prompts[i % len(spec.prompts)])
            with lock:
                records.append(record)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    return summarize(records, time.perf_counter() - t0, concurrency)


def summarize(records: list[RequestRecord], wall_s: float, concurrency: int) -> dict:
    ok = [r for r in records if r.ok]
    tokens = sum(r.tokens for r in ok)
    latencies = [r.latency_s for r in ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    errors = [r.error for r in records if not r.ok]
    return {"concurrency": concurrency, "requests": len(records), "errors": len(errors),
            "error_examples": sorted(set(errors))[:3], "wall_s": wall_s, "tokens": tokens,
            "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
            "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
            "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "records": [asdict(r) for r in records]}


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, linearly interpolated between the closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def render_table(levels: list[dict]) -> str:
    def secs(v):
        return "–" if v is None else f"{v:.2f}"

    lines = ["| concurrency | requests | errors | tokens/s | requests/s | TTFT p50 / p99 (s) | latency p50 / p99 (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for lv in levels:
        lines.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {lv['tokens_per_s']:.1f} | "
                     f"{lv['requests_per_s']:.2f} | {secs(lv['ttft_p50_s'])} / {secs(lv['ttft_p99_s'])} | "
                     f"{secs(lv['latency_p50_s'])} / {secs(lv['latency_p99_s'])} |")
    return "\n".join(lines)


def plot_levels(levels: list[dict], path: str, title: str) -> None:
    """Left: throughput against concurrency. Right: TTFT and latency percentiles against concurrency."""
    from matplotlib.figure import Figure

    from ar2dlm.utils.files import save_figure

    fig = Figure(figsize=(11, 4))
    ax_tput, ax_lat = fig.subplots(1, 2)
    xs = [lv["concurrency"] for lv in levels]
    ax_tput.plot(xs, [lv["tokens_per_s"] for lv in levels], marker="o")
    ax_tput.set_xlabel("concurrent clients")
    ax_tput.set_ylabel("completion tokens/s")
    for key, style in (("latency_p50_s", "-o"), ("latency_p99_s", "--o"), ("ttft_p50_s", "-s"),
                       ("ttft_p99_s", "--s")):
        points = [(x, lv[key]) for x, lv in zip(xs, levels) if lv[key] is not None]
        ax_lat.plot([p[0] for p in points], [p[1] for p in points], style, label=key.replace("_s", " (s)"))
    ax_lat.set_xlabel("concurrent clients")
    ax_lat.set_ylabel("seconds")
    ax_lat.legend(fontsize=8)
    for ax in (ax_tput, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
