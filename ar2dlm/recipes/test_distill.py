"""`ar2dlm distill` end to end on a tiny model: trajectories, training, outputs, resume, CLI errors (the loss is
tested in distillation/test_loss.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ar2dlm.cli import main
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.recipes.distill import DistillConfig, run
from ar2dlm.testing import tiny_model, tiny_tokenizer

QUESTIONS = ["What is 2 + 3?", "Natalia sold 48 clips in April. How many?", "add a and b", "the quick brown fox"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    tok = tiny_tokenizer()
    dlm = BlockDiffusionLM.from_base(tiny_model("llama", seed=1, vocab_size=len(tok)), tok, block_size=4)
    dlm.save_pretrained(root / "dlm", tok)
    data = root / "data.jsonl"
    with data.open("w") as f:
        for i in range(24):
            q = QUESTIONS[i % 4]
            f.write(json.dumps({"question": f"{q} ({i})", "answer": f"the answer is {i} #### {i}"}) + "\n")
    return root


def _cfg(student, out, **kw):
    base = dict(model=str(student / "dlm"), data=str(student / "data.jsonl"), output=str(out), max_steps=4,
                batch_size=4, heldout=4, warmup_steps=1, lr=1e-3, save_every=2, seq_len=64, teacher_batch_size=8)
    return DistillConfig(**{**base, **kw})


def test_distill_runs_and_writes_everything(student, tmp_path):
    summary = run(_cfg(student, tmp_path / "run"))
    out = tmp_path / "run"
    assert (out / "trajectories.jsonl").exists() and (out / "loss.png").exists()
    assert (out / "summary.json").exists() and not (out / "checkpoint").exists()  # dropped once finished
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "masked_acc", "ce", "entropy", "fraction"} <= set(rows[1])
    assert all(torch.isfinite(torch.tensor([r["loss"], r["entropy"], r["grad_norm"]])).all() for r in rows if "loss" in r)
    assert summary["trajectories"] == 24 and summary["steps"] == 4
    assert summary["heldout_after"]["heldout_tokens"] == summary["heldout_before"]["heldout_tokens"] > 0
    dlm, _ = BlockDiffusionLM.from_pretrained(out / "model")
    assert dlm.config.block_size == 4
    # the trajectory file is reused by a second run (no teacher work), and training changed the weights
    summary2 = run(_cfg(student, tmp_path / "run2", trajectories=str(out / "trajectories.jsonl"), max_steps=1))
    assert summary2["trajectories"] == 24
    before, _ = BlockDiffusionLM.from_pretrained(student / "dlm")
    assert not torch.equal(before.backbone.lm_head.weight, dlm.backbone.lm_head.weight)


def test_teacher_target_with_grading(student, tmp_path):
    """A random teacher never writes the right answer: every record is filtered out -> a clear error."""
    with pytest.raises(Ar2dlmError, match="trajectories"):
        run(_cfg(student, tmp_path / "t", target="teacher", grade="gsm8k", teacher_max_new_tokens=8))
    summary = run(_cfg(student, tmp_path / "t2", target="teacher", teacher_max_new_tokens=8, max_steps=1))
    first = json.loads((tmp_path / "t2" / "trajectories.jsonl").read_text().splitlines()[0])
    assert first["target"] == "teacher" and sum(r >= 0 for r in first["rank"]) <= 8
    assert summary["steps"] == 1


def test_kill_and_resume_is_exact(student, tmp_path):
    env = {**os.environ, "AR2DLM_FAULT_AT_STEP": "3", "OMP_NUM_THREADS": "1"}
    args = ["--model", str(student / "dlm"), "--data", str(student / "data.jsonl"), "--max-steps", "4",
            "--batch-size", "4", "--heldout", "4", "--warmup-steps", "1", "--lr", "1e-3", "--save-every", "2",
            "--seq-len", "64"]
    killed = subprocess.run([sys.executable, "-m", "ar2dlm", "distill", "--output", str(tmp_path / "k"), *args],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "k" / "checkpoint" / "state.pt").is_file()  # unfinished: the checkpoint stays for --resume
    env.pop("AR2DLM_FAULT_AT_STEP")
    resumed = subprocess.run([sys.executable, "-m", "ar2dlm", "distill", "--output", str(tmp_path / "k"), "--resume",
                              *args], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "held-out trajectory-masked accuracy" in resumed.stdout and not (tmp_path / "k" / "checkpoint").exists()
    straight = subprocess.run([sys.executable, "-m", "ar2dlm", "distill", "--output", str(tmp_path / "s"), *args],
                              env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, _ = BlockDiffusionLM.from_pretrained(tmp_path / "k" / "model")
    b, _ = BlockDiffusionLM.from_pretrained(tmp_path / "s" / "model")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_cli_errors(student, tmp_path, capsys):
    assert main(["distill", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "no dLM checkpoint" in capsys.readouterr().err
    assert main(["distill", "--model", str(student / "dlm"), "--grade", "gsm8k", "--output", str(tmp_path / "o")]) == 2
    assert "--target teacher" in capsys.readouterr().err
    assert main(["distill", "--model", str(student / "dlm"), "--ratio-max", "0", "--output", str(tmp_path / "o")]) == 2
    capsys.readouterr()
    argv = ["distill", "--model", str(student / "dlm"), "--output", str(tmp_path / "o")]
    assert main([*argv, "--max-records", "0"]) == 2
    assert capsys.readouterr().err.strip() == "ar2dlm: error: --max-records must be >= 1, got 0"


def test_lora_distillation_saves_an_adapter_on_the_student(student, tmp_path):
    summary = run(_cfg(student, tmp_path / "lora", lora_rank=4, max_steps=2))
    assert summary["lora_rank"] == 4
    out = tmp_path / "lora" / "model"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    merged, _ = BlockDiffusionLM.from_pretrained(out)
    before, _ = BlockDiffusionLM.from_pretrained(student / "dlm")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        a, _ = merged(ids)
        b, _ = before(ids)
    assert a.shape == b.shape and not torch.allclose(a, b)  # the adapter changed the student, on top of it


def test_block_size_curriculum_grows_the_student_block(student, tmp_path):
    summary = run(_cfg(student, tmp_path / "grow", block_sizes="4,8", max_steps=4))
    assert summary["block_sizes"] == [4, 8]
    rows = [json.loads(ln) for ln in (tmp_path / "grow" / "metrics.jsonl").read_text().splitlines()]
    assert [r["block_size"] for r in rows if "loss" in r] == [4, 4, 8, 8]
    dlm, _ = BlockDiffusionLM.from_pretrained(tmp_path / "grow" / "model")
    assert dlm.config.block_size == 8
    with pytest.raises(Ar2dlmError, match="block-sizes"):
        _cfg(student, tmp_path / "bad", block_sizes="4,x")
    with pytest.raises(Ar2dlmError, match="block-sizes"):
        _cfg(student, tmp_path / "bad", block_sizes="0")


def test_truncate_cuts_at_a_block_boundary():
    from ar2dlm.recipes.distill import truncate
    from ar2dlm.distillation.trajectories import Trajectory

    long = Trajectory(list(range(11)), [-1, -1, 0, 1, 2, 0, 3, 1, 0, 1, 2])
    short = Trajectory([1, 2, 3], [-1, 0, 1])
    prompt_only = Trajectory(list(range(9)), [-1] * 8 + [0])
    out = truncate([long, short, prompt_only], seq_len=7, block_size=4)
    assert [t.input_ids for t in out] == [[0, 1, 2, 3], [1, 2, 3]]  # 7 -> 4 (whole blocks); prompt-only dropped
    assert out[0].rank == [-1, -1, 0, 1]
