"""`ar2dlm bench-serve`: the load generator against a server it starts on a tiny model, and against one given by
URL; percentiles; its option checks."""

from __future__ import annotations

import json

import pytest

from ar2dlm.cli import main
from ar2dlm.serving.bench import RequestRecord, percentile, summarize
from ar2dlm.serving.conftest import MODEL_NAME, serving


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert percentile(list(range(101)), 99) == 99


def test_summarize_counts_errors_apart():
    records = [RequestRecord(True, 1.0, 0.1, 10), RequestRecord(True, 3.0, 0.3, 20),
               RequestRecord(False, 0.5, None, 0, "APIConnectionError: refused")]
    level = summarize(records, wall_s=4.0, concurrency=2)
    assert level["requests"] == 3 and level["errors"] == 1 and level["tokens"] == 30
    assert level["tokens_per_s"] == 7.5 and level["requests_per_s"] == 0.5
    assert level["latency_p50_s"] == 2.0 and level["error_examples"] == ["APIConnectionError: refused"]


def test_bench_serve_on_a_model_it_serves(tiny_dlm_folder, tmp_path, capsys):
    out, plot = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench-serve", "--model", str(tiny_dlm_folder), "--concurrency", "1,4", "--requests", "4",
                 "--max-tokens", "4", "--decoding", '{"tau": 0.5}', "--json-out", str(out),
                 "--plot-out", str(plot)]) == 0
    results = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in results["levels"]] == [1, 4]
    for level in results["levels"]:
        assert level["requests"] == 4 and level["errors"] == 0 and level["tokens"] > 0
        assert level["ttft_p50_s"] <= level["latency_p50_s"] and level["rss_mb_after"] > 0
    assert plot.stat().st_size > 0 and "| concurrency |" in capsys.readouterr().out


def test_bench_serve_against_a_url_for_a_duration(tiny_dlm, tmp_path):
    from ar2dlm.recipes.bench_serve import BenchServeConfig, run

    with serving(tiny_dlm) as (server, _):
        results = run(BenchServeConfig(url=server.url, concurrency="2", duration_s=0.5, max_tokens=3, raw=True))
    level = results["levels"][0]
    assert results["model"] == MODEL_NAME and level["errors"] == 0 and level["requests"] >= 2
    assert level["rss_mb_before"] is None  # a server elsewhere: its memory is not ours to read


@pytest.mark.parametrize("extra, message", [
    ([], "exactly one of --url"),
    (["--url", "http://x", "--model", "m"], "exactly one of --url"),
    (["--url", "http://x", "--concurrency", "1,a"], "--concurrency must be integers"),
    (["--url", "http://x", "--concurrency", "0"], "levels >= 1"),
    (["--url", "http://x", "--decoding", "[1]"], "must be a JSON object"),
    (["--url", "http://x", "--decoding", "{"], "--decoding is not JSON"),
    (["--url", "http://x", "--duration-s", "0"], "--duration-s must be > 0"),
])
def test_bad_options(capsys, extra, message):
    assert main(["bench-serve", *extra]) == 2
    assert message in capsys.readouterr().err


def test_an_unreachable_server_is_one_error_line(capsys):
    assert main(["bench-serve", "--url", "http://127.0.0.1:9", "--requests", "1"]) == 2
    assert "cannot list the server's models" in capsys.readouterr().err
