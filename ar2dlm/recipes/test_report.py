"""`ar2dlm report`: the table holds every point of every run, the plot is a PNG, bad files are one-line errors."""

from __future__ import annotations

import copy
import json

import pytest

from ar2dlm.cli import main
from ar2dlm.evaluation.aup import aup_table
from ar2dlm.evaluation.report import render_markdown
from ar2dlm.testing import tiny_base

GSM = [{"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"} for i in range(3)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real eval of a tiny AR model (run as a block-size-1 dLM, its own parent) and an edited copy of it."""
    root = tmp_path_factory.mktemp("report")
    base = tiny_base(root)
    data = root / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM), encoding="utf-8")
    first = root / "a.json"
    assert main(["eval", "--model", str(base), "--task", "gsm8k", "--source", str(data), "--no-chat",
                 "--max-new-tokens", "4", "--sweep", "policy=threshold,ar", "--baseline-ar", "--output",
                 str(first)]) == 0
    other = copy.deepcopy(json.loads(first.read_text()))
    other["model"] = "/models/other-dlm"
    for i, p in enumerate(other["points"]):
        p["model"], p["accuracy"], p["tpf"] = "/models/other-dlm", 50.0 - 10 * i, 1.0 + i
        p["label"] = f"other point {i}"
    other["aup"] = 42.0
    second = root / "b.json"
    second.write_text(json.dumps(other))
    return first, second


def test_report_table_has_every_point(runs, tmp_path, capsys):
    md, png = tmp_path / "t.md", tmp_path / "p.png"
    capsys.readouterr()
    assert main(["report", *map(str, runs), "--markdown-out", str(md), "--plot-out", str(png)]) == 0
    out = capsys.readouterr().out
    assert md.read_text() == out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = [json.loads(p.read_text()) for p in runs]
    rows = [line for line in out.splitlines() if line.startswith("| ") and line.count("|") == 8][1:]  # no header
    points = [(r, p) for r in results for p in r["points"]]
    assert len(rows) == len(points) == 6
    for row, (r, p) in zip(rows, points):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == p["label"] and cells[1] == "gsm8k"
        assert cells[3:] == [f"{p['accuracy']:.1f}", f"{p['tpf']:.2f}", f"{p['tokens_per_s']:.1f}", f"{r['aup']:.1f}"]
    assert [row.split("|")[1].strip() for row in rows] == ["tiny-llama"] * 3 + ["other-dlm"] * 3
    # Two runs on one task: their AUP with a shared y_max.
    shared = aup_table({f"{i + 1}: {n}": [(p["tpf"], p["accuracy"]) for p in r["points"]]
                        for i, (n, r) in enumerate(zip(["tiny-llama", "other-dlm"], results))})
    for name, value in shared.items():
        assert f"| gsm8k | {name} | {value:.1f} |" in out


def test_report_of_one_run_labels_the_parent(runs):
    run = json.loads(runs[0].read_text())
    text = render_markdown([run])
    assert "AR parent (ar, block 1)" in text and "threshold policy=ar" not in text and "| policy=ar |" in text
    assert "shared y_max" not in text  # one run: nothing to share


_RUN = ('{"schema": "ar2dlm.eval/1", "model": "m", "task": "gsm8k", "aup": 10.0, "points": '
        '[{"label": "threshold", "kind": "dlm", "accuracy": 50.0, "tpf": 1.5, "tokens_per_s": 20.0}]}')


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "not JSON"),
    ('{"points": []}', "not a results file"),
    # the right schema, but edited or cut: used to be a KeyError / AttributeError halfway through the table
    (_RUN.replace('"accuracy": 50.0', '"accuracy": "high"'), "point 0 needs a numeric 'accuracy'"),
    (_RUN.replace('"tpf": 1.5, ', ''), "point 0 needs a numeric 'tpf'"),
    (_RUN.replace('"points": [{', '"points": [1, {'), "point 0 needs a 'label'"),
    (_RUN.replace('"model": "m", ', ''), "needs 'model'"),
])
def test_bad_results_file_exits_2(tmp_path, capsys, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    capsys.readouterr()
    assert main(["report", str(path)]) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert out.out == ""  # no half table


def test_unwritable_outputs_fail_before_the_table(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(_RUN)
    assert main(["report", str(path)]) == 0  # the hand-made run is a valid one
    capsys.readouterr()
    (tmp_path / "a_file").write_text("x")
    for flag, target in (("--markdown-out", tmp_path), ("--plot-out", tmp_path / "a_file" / "p.png")):
        assert main(["report", str(path), flag, str(target)]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith(f"ar2dlm: error: {flag} ") and out.err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "r.json"]


def test_model_names_keep_the_run_folder():
    from ar2dlm.evaluation.report import _name

    assert _name("runs/main-A/model") == "main-A/model"
    assert _name("/models/other-dlm") == "other-dlm"
    assert _name("smollm2-135m") == "smollm2-135m"
