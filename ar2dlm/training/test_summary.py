"""A run's summary in plain lines, and the checkpoint a finished run drops."""

from __future__ import annotations

import json

from ar2dlm.training import checkpoint
from ar2dlm.training.summary import main, summary_lines

CONVERT = {
    "model": "smollm2-135m", "output": "runs/x/model", "steps": 120, "tokens": 88812, "train_seconds": 744.4,
    "stopped_early": False, "heldout_before": {"heldout_loss": 6.2512345678, "heldout_acc": 0.27123456789},
    "heldout_after": {"heldout_loss": 2.3198765432, "heldout_acc": 0.52109876543}, "dlm": {"block_size": 4},
    "rank_param_checksums": [12345.678901234567], "samples": [{"text": "x", "correct": 1, "masked": 2}],
}


def test_convert_summary_reads_as_plain_lines():
    assert summary_lines(CONVERT) == [
        "smollm2-135m -> dLM (block 4): 120 steps, 88.8K tokens, 12.4 min of training (--max-steps reached)",
        "held-out masked-token accuracy 27.1% -> 52.1% (loss 6.25 -> 2.32)",
        "model: runs/x/model",
    ]


def test_time_budget_distill_drafter_and_no_heldout():
    lines = summary_lines({**CONVERT, "stopped_early": True, "trajectories": 96, "block_sizes": [4, 8]})
    assert "distilled dLM (block 4 -> 8)" in lines[0] and "stopped by the --max-minutes budget" in lines[0]
    assert lines[1].startswith("held-out trajectory-masked accuracy 27.1% -> 52.1%")
    drafter = {"lora_rank": 32, "before": {"draft_acc": [0.0, 0.0, 0.0], "tokens_per_verify_step": 1.0},
               "after": {"draft_acc": [0.5, 0.25, 0.125], "tokens_per_verify_step": 1.6}}
    lines = summary_lines({**CONVERT, "drafter": drafter})
    assert "gated drafter (LoRA rank 32)" in lines[0]
    assert "tokens per verify step 1.00 -> 1.60 (draft accuracy at +1/+2/+3: 50% / 25% / 12%)" in lines
    assert summary_lines({**CONVERT, "heldout_before": {}, "heldout_after": {}})[1] == "model: runs/x/model"


def test_main_prints_a_run_folder(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps(CONVERT))
    assert main([str(tmp_path)]) == 0
    assert "held-out masked-token accuracy 27.1% -> 52.1%" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2 and "cannot read" in capsys.readouterr().err


def test_removing_a_checkpoint_takes_what_interrupted_saves_left(tmp_path):
    for name in ("checkpoint", ".checkpoint.abc123.tmp", ".checkpoint.old", "model"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_text("x")
    checkpoint.remove(tmp_path / "checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    checkpoint.remove(tmp_path / "checkpoint")  # nothing there: fine
