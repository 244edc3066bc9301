"""`ar2dlm bench-serve`: load an OpenAI-compatible server: throughput, TTFT and latency p50/p99, errors per concurrency.

Concurrent streamed requests over the `openai` client, one level per concurrency; a table, JSON and a plot.

Point it at a running server (`--url`), or give `--model` to start `ar2dlm serve` on it in this process (on a free
loopback port; its memory is then measured before and after each level). `--duration-s` runs each level for that
long instead of `--requests` requests: a soak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ar2dlm.errors import Ar2dlmError
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
from ar2dlm.utils.files import check_output_file, write_json


@dataclass(kw_only=True)
class BenchServeConfig:
    url: str | None = field(default=None, metadata={"help": "a running server (http://HOST:PORT)"})
    model: str | None = field(default=None, metadata={"help": "start a server on this model in-process instead"})
    model_name: str | None = field(default=None, metadata={"help": "the model to ask for (default: the server's)"})
    api_key: str | None = field(default=None, metadata={"help": "bearer key (default: $AR2DLM_API_KEY)"})
    concurrency: str = field(default="1,2,4,8,16", metadata={"help": "concurrent clients, one level each"})
    requests: int = field(default=32, metadata={"help": "requests per level"})
    duration_s: float | None = field(default=None, metadata={"help": "run each level this long instead (a soak)"})
    max_tokens: int = field(default=64, metadata={"help": "max_tokens of every request"})
    prompts: str | None = field(default=None, metadata={"help": "file with one prompt per line (default: built-in)"})
    raw: bool = field(default=False, metadata={"help": "plain continuations (/v1/completions), not chat turns"})
    decoding: str = field(default="{}", metadata={
        "help": "the requests' `ar2dlm` field as JSON, e.g. '{\"policy\": \"threshold\", \"tau\": 0.7}'"})
    max_running: int = field(default=16, metadata={"help": "--model: the server's cache rows"})
    json_out: str | None = field(default=None, metadata={"help": "write the results here"})
    plot_out: str | None = field(default=None, metadata={"help": "write throughput/latency plots here"})

    def __post_init__(self):
        if (self.url is None) == (self.model is None):
            raise Ar2dlmError("give exactly one of --url (a running server) and --model (start one here)")
        if self.requests < 1 or self.max_tokens < 1 or self.max_running < 1:
            raise Ar2dlmError("--requests, --max-tokens and --max-running must be >= 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise Ar2dlmError(f"--duration-s must be > 0, got {self.duration_s}")
        self.levels()
        self.decoding_fields()
        self.api_key = self.api_key or os.environ.get("AR2DLM_API_KEY") or None
        check_output_file(self.json_out, "--json-out")
        check_output_file(self.plot_out, "--plot-out")

    def levels(self) -> list[int]:
        try:
            levels = [int(x) for x in self.concurrency.split(",") if x.strip()]
        except ValueError:
            raise Ar2dlmError(f"--concurrency must be integers separated by commas, got {self.concurrency!r}") \
                from None
        if not levels or min(levels) < 1:
            raise Ar2dlmError(f"--concurrency needs levels >= 1, got {self.concurrency!r}")
        return levels

    def decoding_fields(self) -> dict:
        try:
            value = json.loads(self.decoding)
        except ValueError as e:
            raise Ar2dlmError(f"--decoding is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise Ar2dlmError("--decoding must be a JSON object of decoding fields")
        return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, BenchServeConfig)


def config_from_args(args: argparse.Namespace) -> BenchServeConfig:
    return dataclass_from_args(BenchServeConfig, args)


def run(cfg: BenchServeConfig) -> dict:
    from ar2dlm.evaluation.agreement import load_prompts

    prompts = load_prompts(cfg.prompts)
    if cfg.model is None:
        return _bench(cfg, cfg.url.rstrip("/"), prompts, server_pid=None)
    from ar2dlm.recipes.serve import ServeConfig, build_app
    from ar2dlm.serving.server import ServerThread

    # every client may wait: no 429s from the in-process server at any level
    app = build_app(ServeConfig(model=cfg.model, max_running=cfg.max_running,
                                max_waiting=max(cfg.levels()), api_key=cfg.api_key))
    with ServerThread(app) as server:
        return _bench(cfg, server.url, prompts, server_pid=os.getpid())


def _bench(cfg: BenchServeConfig, url: str, prompts: list[str], server_pid: int | None) -> dict:
    import openai

    from ar2dlm.serving.bench import LoadSpec, one_request, plot_levels, render_table, run_level

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=cfg.api_key or "none", max_retries=0, timeout=600)
    name = cfg.model_name or _served_name(client)
    spec = LoadSpec(name, prompts, cfg.max_tokens, cfg.decoding_fields(), cfg.raw)
    warm = one_request(client, spec, prompts[0])  # untimed; also the first check that the server answers
    if not warm.ok:
        raise Ar2dlmError(f"the server at {url} did not answer: {warm.error}")
    levels = []
    for concurrency in cfg.levels():
        print(f"concurrency {concurrency} ...", file=sys.stderr)
        rss_before = _rss_mb(server_pid)
        level = run_level(client, spec, concurrency, None if cfg.duration_s else cfg.requests, cfg.duration_s)
        level.update(rss_mb_before=rss_before, rss_mb_after=_rss_mb(server_pid))
        levels.append(level)
    results = {"url": url, "model": name, "decoding": spec.decoding, "max_tokens": cfg.max_tokens,
               "raw": cfg.raw, "levels": levels}
    print(render_table(levels))
    if cfg.json_out:
        write_json(cfg.json_out, results)
    if cfg.plot_out:
        plot_levels(levels, cfg.plot_out, f"{name}, {cfg.max_tokens} tokens, decoding {spec.decoding or 'default'}")
    return results


def _served_name(client) -> str:
    try:
        return client.models.list().data[0].id
    except Exception as e:  # noqa: BLE001 - unreachable server, wrong key: say so in one line
        raise Ar2dlmError(f"cannot list the server's models: {e}") from None


def _rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process in MB (Linux /proc), None where it cannot be read."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
