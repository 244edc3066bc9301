"""scripts/main.sh decides what to run: by default the shipped dLM beside its parent (`ar2dlm bench`); with `convert`,
convert (or resume) then compare, or reuse a finished run and say so. Run against stand-ins for `ar2dlm` and env.sh
that record the commands instead of running anything."""

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
RUN = "runs/smollm2-135m-convert"


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


def test_by_default_the_shipped_dlm_is_benched_beside_its_parent(repo):
    res, calls = _main_sh(repo, "--max-new-tokens", "32")
    assert res.returncode == 0, res.stderr
    assert calls == ["bench --model smollm2-135m-dlm --policies verify,verify+tree,verify:auto+lookup+tree"
                     " --batch-sizes 1 --max-new-tokens 64 --json-out runs/main/bench.json --plot-out runs/main/bench.png "
                     "--max-new-tokens 32"]


def test_a_fresh_folder_is_converted_with_the_extra_arguments_then_compared(repo):
    res, calls = _main_sh(repo, "convert", "--max-minutes", "10")
    assert res.returncode == 0, res.stderr
    assert calls == [f"convert --model smollm2-135m --output {RUN} --max-minutes 25 --max-minutes 10",
                     f"compare --model {RUN}/model --thresholds 0.9,0.7,0.5 --json-out {RUN}/compare.json"]


def test_a_finished_run_is_reused_and_ignored_arguments_are_named(repo):
    _finished_run(repo)
    res, calls = _main_sh(repo, "convert", "--max-steps", "5")
    assert res.returncode == 0, res.stderr
    assert [c.split()[0] for c in calls] == ["compare"]
    assert "NOT converting again with: --max-steps 5" in res.stderr and f"rm -r {RUN}" in res.stderr
    assert "--output runs/" in res.stderr
    # the summary in plain words, not raw JSON
    assert "held-out masked-token accuracy 27.1% -> 52.1%" in res.stdout and "{" not in res.stdout


def test_a_finished_run_without_arguments_is_reused_quietly(repo):
    _finished_run(repo)
    res, calls = _main_sh(repo, "convert")
    assert res.returncode == 0 and res.stderr == "" and [c.split()[0] for c in calls] == ["compare"]
    assert "Reusing the finished conversion" in res.stdout


def test_a_new_output_folder_converts_again(repo):
    _finished_run(repo)
    res, calls = _main_sh(repo, "convert", "--output", "runs/again", "--max-steps", "5")
    assert res.returncode == 0, res.stderr
    assert calls[0] == "convert --model smollm2-135m --output runs/again --max-minutes 25 --output runs/again " \
                       "--max-steps 5"
    assert calls[1].startswith("compare --model runs/again/model")


def test_an_unfinished_run_is_resumed(repo):
    (repo / RUN / "checkpoint").mkdir(parents=True)
    (repo / RUN / "checkpoint" / "state.pt").write_text("x")
    res, calls = _main_sh(repo, "convert")
    assert res.returncode == 0 and "resuming the unfinished conversion" in res.stderr
    assert calls[0] == f"convert --model smollm2-135m --output {RUN} --max-minutes 25 --resume"


def test_ship_drafter_packs_a_finished_run_in_half_precision(tmp_path):
    """scripts/ship_drafter.py: a finished drafter run becomes a shipped folder (half-precision adapter, tokenizer,
    training record with the command and the acceptance curve) that loads like any dLM; other runs are refused."""
    import dataclasses

    import torch
    from safetensors import safe_open

    from ar2dlm.drafter.gated import GatedDrafterLM
    from ar2dlm.model.loading import load_base
    from ar2dlm.model.open import load_dlm
    from ar2dlm.testing import tiny_base
    from ar2dlm.training.config import ConvertConfig

    base = tiny_base(tmp_path)
    model, tok = load_base(str(base))
    run = tmp_path / "run"
    GatedDrafterLM.from_base(model, tok, block_size=4, base_model=str(base), rank=2).save_pretrained(run / "model", tok)
    cfg = ConvertConfig(model=str(base), output=str(run), drafter=True, lora_rank=2, data="/x/gsm8k_train.jsonl")
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    metrics = [{"step": 0, "heldout_draft_acc_1": 0.1, "heldout_draft_acc_2": 0.0, "heldout_draft_accepted": 0.1},
               {"step": 5, "tokens": 900, "loss": 2.0},
               {"step": 5, "heldout_draft_acc_1": 0.5, "heldout_draft_acc_2": 0.25, "heldout_draft_accepted": 0.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    script = [sys.executable, str(REPO / "scripts" / "ship_drafter.py")]
    dest = tmp_path / "drafters"
    refused = subprocess.run(script + [str(base), "--dest", str(dest)], capture_output=True, text=True)
    assert refused.returncode == 1 and "not a finished drafter run" in refused.stderr
    assert not dest.exists() or not any(dest.iterdir())
    (run / "summary.json").write_text(json.dumps({"drafter": {"after": {}}}))
    res = subprocess.run(script + [str(run), "--dest", str(dest), "--name", "tiny-dlm", "--plot-out",
                                   str(tmp_path / "curve.png")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
    folder = dest / "tiny-dlm"
    record = json.loads((folder / "training.json").read_text())
    assert record["command"] == (f"ar2dlm convert --lora-rank 2 --model {base} --data gsm8k_train.jsonl --drafter")
    assert [p["training_tokens"] for p in record["curve"]] == [0, 900]
    assert record["curve"][-1]["tokens_per_verify_step"] == 1.6 and record["training_tokens"] == 900
    with safe_open(str(folder / "drafter.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    loaded, _ = load_dlm(folder)
    assert isinstance(loaded, GatedDrafterLM) and loaded.mask_embedding.dtype == torch.float32

    # a run that continued the shipped drafter replaces it and keeps its record as where it started from
    cfg = dataclasses.replace(cfg, init_drafter=str(folder), data="/x/self.jsonl")
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    res = subprocess.run(script + [str(run), "--dest", str(dest), "--name", "tiny-dlm"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    again = json.loads((folder / "training.json").read_text())
    assert again["started_from"]["command"] == record["command"] and again["started_from"]["drafter"] == str(folder)
    assert again["training_tokens"] == 900 and again["total_training_tokens"] == 1800
