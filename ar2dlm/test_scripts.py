"""scripts/main.sh decides what to run: convert (or resume) then compare, or reuse a finished run and say so. Run
against stand-ins for `ar2dlm` and env.sh that record the commands instead of converting anything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ar2dlm.training.test_summary import CONVERT

REPO = Path(__file__).resolve().parent.parent
RUN = "runs/smollm2-135m-dlm"


@pytest.fixture
def repo(tmp_path):
    """A copy of main.sh beside an env.sh that only enters the repo, and an `ar2dlm` that logs its arguments."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "main.sh", tmp_path / "scripts" / "main.sh")
    (tmp_path / "scripts" / "env.sh").write_text('set -euo pipefail\ncd "$(dirname "${BASH_SOURCE[0]}")/.."\n')
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "ar2dlm"
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> calls.log\n')
    stub.chmod(0o755)
    os.symlink(sys.executable, tmp_path / "bin" / "python")
    return tmp_path


def _main_sh(repo: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {**os.environ, "PATH": f"{repo / 'bin'}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(["bash", str(repo / "scripts" / "main.sh"), *args], capture_output=True, text=True, env=env,
                         timeout=120)
    log = repo / "calls.log"
    return res, log.read_text().splitlines() if log.exists() else []


def _finished_run(repo: Path, folder: str = RUN) -> None:
    (repo / folder).mkdir(parents=True)
    (repo / folder / "summary.json").write_text(json.dumps(CONVERT))


def test_a_fresh_folder_is_converted_with_the_extra_arguments_then_compared(repo):
    res, calls = _main_sh(repo, "--max-minutes", "10")
    assert res.returncode == 0, res.stderr
    assert calls == [f"convert --model smollm2-135m --output {RUN} --max-minutes 25 --max-minutes 10",
                     f"compare --model {RUN}/model --thresholds 0.9,0.7,0.5 --json-out {RUN}/compare.json"]


def test_a_finished_run_is_reused_and_ignored_arguments_are_named(repo):
    _finished_run(repo)
    res, calls = _main_sh(repo, "--max-steps", "5")
    assert res.returncode == 0, res.stderr
    assert [c.split()[0] for c in calls] == ["compare"]
    assert "NOT converting again with: --max-steps 5" in res.stderr and f"rm -r {RUN}" in res.stderr
    assert "--output runs/" in res.stderr
    # the summary in plain words, not raw JSON
    assert "held-out masked-token accuracy 27.1% -> 52.1%" in res.stdout and "{" not in res.stdout


def test_a_finished_run_without_arguments_is_reused_quietly(repo):
    _finished_run(repo)
    res, calls = _main_sh(repo)
    assert res.returncode == 0 and res.stderr == "" and [c.split()[0] for c in calls] == ["compare"]
    assert "Reusing the finished conversion" in res.stdout


def test_a_new_output_folder_converts_again(repo):
    _finished_run(repo)
    res, calls = _main_sh(repo, "--output", "runs/again", "--max-steps", "5")
    assert res.returncode == 0, res.stderr
    assert calls[0] == "convert --model smollm2-135m --output runs/again --max-minutes 25 --output runs/again " \
                       "--max-steps 5"
    assert calls[1].startswith("compare --model runs/again/model")


def test_an_unfinished_run_is_resumed(repo):
    (repo / RUN / "checkpoint").mkdir(parents=True)
    (repo / RUN / "checkpoint" / "state.pt").write_text("x")
    res, calls = _main_sh(repo)
    assert res.returncode == 0 and "resuming the unfinished conversion" in res.stderr
    assert calls[0] == f"convert --model smollm2-135m --output {RUN} --max-minutes 25 --resume"
