"""`ar2dlm lm-eval`: lm_eval's own command line with our model, on local YAML tasks and tiny dLMs (no network)."""

from __future__ import annotations

import functools
import json

import pytest

pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from ar2dlm.cli import main  # noqa: E402
from ar2dlm.evaluation.test_lm_eval_adapter import write_tasks  # noqa: E402
from ar2dlm.recipes.lm_eval import with_model  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_cli"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_model_ar2dlm_is_implied():
    assert with_model(["--tasks", "x"]) == ["--model", "ar2dlm", "--tasks", "x"]
    assert with_model(["run", "--tasks", "x"]) == ["run", "--model", "ar2dlm", "--tasks", "x"]
    assert with_model(["--model=hf", "--tasks", "x"]) == ["--model=hf", "--tasks", "x"]
    assert with_model(["ls", "tasks"]) == ["ls", "tasks"]


def test_cli_runs_lm_eval_and_bad_args_exit_2(files, tmp_path, monkeypatch, capsys):
    # lm_eval's CLI indexes its ~15k built-in task files first (10+ s on a CPU): only our local tasks here
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    out = tmp_path / "out"
    rc = main(["lm-eval", "--model_args", f"pretrained={files['dlm4']},samples=1", "--tasks", "tiny_gen,tiny_mc",
               "--include_path", str(files["tasks"]), "--limit", "2", "--output_path", str(out)])
    assert rc == 0
    (results,) = out.rglob("results_*.json")
    data = json.loads(results.read_text())
    assert data["config"]["model"] == "ar2dlm" and set(data["results"]) == {"tiny_gen", "tiny_mc"}
    assert "tiny_gen" in capsys.readouterr().out  # lm_eval's own results table

    rc = main(["lm-eval", "--model_args", f"pretrained={files['dlm4']},temprature=0.5", "--tasks", "tiny_gen",
               "--include_path", str(files["tasks"])])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("ar2dlm: error: unknown ar2dlm model_args: temprature")

    rc = main(["lm-eval", "--model_args", f"pretrained={files['dlm4']}", "--tasks", "tiny_nosuchtask",
               "--include_path", str(files["tasks"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Tasks not found" in err[0] and "tiny_nosuchtask" in err[0]
