"""`ar2dlm bench-width` on a tiny model: the printed curve, files, bad options."""

from __future__ import annotations

import json

from ar2dlm.cli import main
from ar2dlm.model.packed_linear import onednn_available
from ar2dlm.testing import tiny_base


def test_bench_width_prints_and_writes_the_curve(tmp_path, capsys):
    base = tiny_base(tmp_path)
    out, png = tmp_path / "w.json", tmp_path / "w.png"
    assert main(["bench-width", "--model", str(base), "--widths", "4,1,2", "--context", "16", "--repeats", "2",
                 "--linear-kernels", "auto,default", "--decoders", "fused,hf", "--json-out", str(out), "--plot-out", str(png)]) == 0
    res = json.loads(out.read_text())
    assert [p["width"] for p in res["curve"]] == [1, 2, 4] and res["curve"][0]["x_width_1"] == 1.0
    kernels = {"onednn" if onednn_available() else "default", "default"}
    assert set(res["curves"]) == {f"{k} + {d}" for k in kernels for d in ("fused", "hf")}
    assert all([p["width"] for p in c] == [1, 2, 4] for c in res["curves"].values())
    assert png.read_bytes()[:4] == b"\x89PNG" and "positions/s" in capsys.readouterr().out


def test_bench_width_bad_options(tmp_path, capsys):
    for bad in (["--widths", "0,2"], ["--widths", "a"], ["--context", "0"], ["--linear-kernels", "mkl"], ["--decoders", "vllm"]):
        assert main(["bench-width", "--model", str(tmp_path / "none"), *bad]) == 2
        assert "ar2dlm: error:" in capsys.readouterr().err
