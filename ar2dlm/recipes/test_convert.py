"""End-to-end conversion on a tiny model: learning, outputs, exact resume after a kill, and 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.recipes.convert import run
from ar2dlm.testing import tiny_base
from ar2dlm.training.config import ConvertConfig

QA = [
    ("What is two plus two?", "Two plus two is four."),
    ("Name a colour of the sky.", "The sky is blue on a clear day."),
    ("What does a fox do?", "The quick brown fox jumps over the lazy dog."),
    ("Count to five.", "0 1 2 3 4 5"),
]


def write_chat_data(path: Path, n: int = 48) -> Path:
    with path.open("w") as f:
        for i in range(n):
            q, a = QA[i % len(QA)]
            f.write(json.dumps({"question": q, "answer": a}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    return tiny_base(root), write_chat_data(root / "qa.jsonl"), root


def small_config(base, data, out, **kw) -> ConvertConfig:
    args = dict(model=str(base), data=str(data), output=str(out), seq_len=48, batch_size=4, heldout=8,
                max_steps=30, warmup_steps=3, lr=3e-3, save_every=10, block_size=4, device="cpu")
    args.update(kw)
    return ConvertConfig(**args)


def test_conversion_learns_and_writes_outputs(setup, capsys):
    base, data, root = setup
    out = root / "run-basic"
    summary = run(small_config(base, data, out))
    before, after = summary["heldout_before"], summary["heldout_after"]
    assert after["heldout_loss"] < before["heldout_loss"] - 0.5, (before, after)
    assert after["heldout_acc"] > before["heldout_acc"]
    for name in ("metrics.jsonl", "loss.png", "summary.json", "config.json", "model/config.json"):
        assert (out / name).is_file(), name
    # a finished run drops its resume checkpoint (1.6 GB on SmolLM2, issue 13)
    assert not (out / "checkpoint").exists() and not list(out.glob(".checkpoint*"))
    # and says what it learned in plain words, not as raw JSON
    printed = capsys.readouterr().out
    assert f"held-out masked-token accuracy {before['heldout_acc']:.1%} -> {after['heldout_acc']:.1%}" in printed
    assert "30 steps" in printed and "--max-steps reached" in printed
    assert "rank_param_checksums" not in printed and "{" not in printed
    dlm, tok = BlockDiffusionLM.from_pretrained(out / "model")
    assert dlm.config.block_size == 4 and dlm.config.mask_token_id == len(tok) - 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))


def test_existing_run_is_never_overwritten(setup):
    base, data, root = setup
    kept = root / "run-kept"
    run(small_config(base, data, kept, max_steps=2, save_every=1, keep_checkpoint=True))
    assert (kept / "checkpoint" / "state.pt").is_file()
    with pytest.raises(Ar2dlmError, match="--resume"):
        run(small_config(base, data, kept, max_steps=2))
    dropped = root / "run-dropped"
    run(small_config(base, data, dropped, max_steps=2, save_every=1))
    with pytest.raises(Ar2dlmError, match="already holds a finished run: remove it"):
        run(small_config(base, data, dropped, max_steps=2))
    with pytest.raises(Ar2dlmError, match="finished run whose checkpoint was dropped"):
        run(small_config(base, data, dropped, max_steps=4, resume=True))
    with pytest.raises(Ar2dlmError, match="no checkpoint"):
        run(small_config(base, data, root / "never-ran", resume=True))


def _cli(args: list[str], env_extra: dict | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
               "-m", "ar2dlm", *args]
    else:
        cmd = [sys.executable, "-m", "ar2dlm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _args(base, data, out, steps=8, extra=()):
    return ["convert", "--model", str(base), "--data", str(data), "--output", str(out), "--seq-len", "48",
            "--batch-size", "4", "--heldout", "8", "--max-steps", str(steps), "--warmup-steps", "2", "--lr", "3e-3",
            "--save-every", "2", "--device", "cpu", *extra]


def _weights(folder: Path) -> dict:
    dlm, _ = BlockDiffusionLM.from_pretrained(folder)
    return {k: v.clone() for k, v in dlm.state_dict().items()}


def test_killed_run_resumes_exactly(setup):
    base, data, root = setup
    straight = root / "straight"
    res = _cli(_args(base, data, straight))
    assert res.returncode == 0, res.stderr[-2000:]

    killed = root / "killed"
    res = _cli(_args(base, data, killed), env_extra={"AR2DLM_FAULT_AT_STEP": "5"})
    assert res.returncode != 0  # SIGKILL after step 5: the last checkpoint holds step 4
    assert not (killed / "model").exists() and (killed / "checkpoint" / "state.pt").is_file()  # unfinished: kept
    res = _cli(_args(base, data, killed, extra=["--resume"]))
    assert res.returncode == 0, res.stderr[-2000:]

    a, b = _weights(straight / "model"), _weights(killed / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 9))  # step 5 was redone, not logged twice


def test_ddp_two_processes_stay_in_sync(setup):
    base, data, root = setup
    out = root / "ddp"
    res = _cli(_args(base, data, out, steps=4), torchrun=2)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    sums = summary["rank_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert (out / "model" / "config.json").is_file()


def test_cli_bad_input_is_one_line(setup, tmp_path):
    base, _, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{not json\n')
    res = _cli(["convert", "--model", str(base), "--data", str(bad), "--output", str(tmp_path / "o")])
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "bad.jsonl:2" in res.stderr, res.stderr
    res = _cli(["convert", "--model", "no-such-model", "--output", str(tmp_path / "o2")])
    assert res.returncode == 2 and res.stderr.startswith("ar2dlm: error:"), res.stderr
    res = _cli(["convert", "--model", str(base), "--block-size", "0", "--output", str(tmp_path / "o3")])
    assert res.returncode == 2 and "block-size" in res.stderr


@pytest.mark.parametrize("extra, message", [
    (["--log-every", "0"], "--log-every"),  # was a ZeroDivisionError at the first step
    (["--grad-clip", "-1"], "--grad-clip"),  # was silently training with flipped gradients
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--eval-every", "-1"], "--eval-every"),  # was a held-out evaluation at every step
    (["--max-records", "0"], "--max-records"),
    (["--self-samples", "0"], "--self-samples"),
    (["--output", "{tmp}/a_file"], "is a file; name a folder"),
    (["--output", "{tmp}/a_file/run"], "is a file, not a folder"),
])
def test_cli_bad_settings_fail_before_loading(tmp_path, capsys, extra, message):
    from ar2dlm.cli import main

    (tmp_path / "a_file").write_text("x")
    extra = [a.format(tmp=tmp_path) for a in extra]
    argv = ["convert", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "run"), "--device", "cpu"]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ar2dlm: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cli_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    from ar2dlm.cli import main

    assert main(["convert", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "run"),
                 "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "ar2dlm: error: --device cuda but no CUDA device is available"


def test_fsdp_matches_ddp(setup):
    base, data, root = setup
    outs = {}
    for mode in ("ddp", "fsdp"):
        out = root / f"shard-{mode}"
        extra = ["--fsdp"] if mode == "fsdp" else []
        res = _cli(_args(base, data, out, steps=3, extra=extra), torchrun=2)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[mode] = _weights(out / "model")
    for k, v in outs["ddp"].items():
        torch.testing.assert_close(outs["fsdp"][k], v, atol=2e-5, rtol=1e-4, msg=k)
