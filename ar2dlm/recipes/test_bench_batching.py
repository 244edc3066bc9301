"""`ar2dlm bench-batching` on a tiny dLM: the trace, both modes, identical outputs, files, errors."""

from __future__ import annotations

import json

import pytest

from ar2dlm.cli import main
from ar2dlm.engine import DecodeParams
from ar2dlm.recipes.bench_batching import make_trace
from ar2dlm.testing import tiny_base, tiny_dlm_folders


@pytest.fixture(scope="module")
def dlm_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batching")
    return tiny_dlm_folders(tmp, tiny_base(tmp), blocks=(4,))["dlm4"]


def test_trace_is_seeded_and_mixed():
    params = DecodeParams(max_new_tokens=40)
    a = make_trace([[1, 2], [3]], 10, 0.2, params, 8, seed=1)
    b = make_trace([[1, 2], [3]], 10, 0.2, params, 8, seed=1)
    assert [(t.arrival_s, t.params.max_new_tokens) for t in a] == [(t.arrival_s, t.params.max_new_tokens) for t in b]
    assert len({t.params.max_new_tokens for t in a}) > 3 and all(8 <= t.params.max_new_tokens <= 40 for t in a)
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:])) and a[-1].arrival_s > 0


def test_bench_batching_runs_and_outputs_match(dlm_dir, tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench-batching", "--model", str(dlm_dir), "--requests", "6", "--mean-interval-ms", "20",
                 "--max-running", "3", "--max-new-tokens", "12", "--min-new-tokens", "4", "--tau", "0.6",
                 "--json-out", str(out), "--plot-out", str(png)]) == 0
    res = json.loads(out.read_text())
    assert res["identical_outputs"] is True and png.stat().st_size > 0
    one, cont = res["modes"].values()
    assert len(one["requests"]) == len(cont["requests"]) == 6
    assert cont["forwards"] < one["forwards"]  # several requests share a forward
    assert all(r["latency_s"] >= r["end_s"] - r["start_s"] - 1e-6 for r in cont["requests"])
    assert "throughput x" in capsys.readouterr().out


def test_bench_batching_bad_options(dlm_dir, capsys):
    assert main(["bench-batching", "--model", str(dlm_dir), "--requests", "0"]) == 2
    assert "--requests" in capsys.readouterr().err
