"""`ar2dlm convert --drafter` end to end on a tiny model: outputs, the draft acceptance summary, the parent intact
after training, and exact resume after a kill."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ar2dlm.drafter.gated import DRAFTER_WEIGHTS_FILE, GatedDrafterLM
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.loading import load_base
from ar2dlm.model.open import load_dlm
from ar2dlm.recipes.convert import run
from ar2dlm.testing import QA_ANSWERS, qa_records, tiny_base, write_jsonl
from ar2dlm.training.config import ConvertConfig

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafter")
    return tiny_base(root), write_jsonl(root / "qa.jsonl", qa_records()), root


def args(base, data, out, steps, extra=()):
    return ["convert", "--drafter", "--model", str(base), "--data", str(data), "--output", str(out), "--seq-len",
            "48", "--batch-size", "4", "--heldout", "8", "--max-steps", str(steps), "--warmup-steps", "2", "--lr",
            "3e-3", "--save-every", "2", "--device", "cpu", *extra]


def cli(argv, env_extra=None, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] if torchrun else []
    return subprocess.run([sys.executable, *launcher, "-m", "ar2dlm", *argv], capture_output=True, text=True,
                          env=env, timeout=300)


def test_drafter_conversion_end_to_end(setup):
    base, data, root = setup
    out = root / "run"
    cfg = ConvertConfig(drafter=True, model=str(base), data=str(data), output=str(out), seq_len=48, batch_size=4,
                        heldout=8, max_steps=12, warmup_steps=2, lr=1e-2, save_every=6, device="cpu")
    assert cfg.lora_rank == 32  # --drafter implies an adapter
    summary = run(cfg)
    before, after = summary["heldout_before"], summary["heldout_after"]
    assert after["heldout_loss"] < before["heldout_loss"], (before, after)
    drafter = summary["drafter"]
    assert drafter["target"] == "argmax" and drafter["anchors"] > 0
    assert len(drafter["after"]["draft_acc"]) == 3 and 1.0 <= drafter["after"]["tokens_per_verify_step"] <= 4.0
    assert json.loads((out / "summary.json").read_text())["drafter"] == drafter
    assert summary["dlm"]["drafter"] and summary["dlm"]["clean_attention"] == "token_causal"
    assert {p.name for p in (out / "model").glob("*.safetensors")} == {DRAFTER_WEIGHTS_FILE}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert "heldout_draft_acc_1" in rows[0] and "heldout_draft_accepted" in rows[-1]

    # the trained adapter changed, and the clean positions are still the parent's, exactly
    model, _ = load_dlm(out / "model")
    assert isinstance(model, GatedDrafterLM)
    assert any(v.abs().sum() > 0 for k, v in load_file(out / "model" / DRAFTER_WEIGHTS_FILE).items()
               if k.endswith("lora_B"))
    parent, tok = load_base(str(base))
    vocab, mask_id = parent.config.vocab_size, model.config.mask_token_id
    prompt = tok("Question 3?", return_tensors="pt").input_ids
    fed = torch.cat([prompt, torch.full((1, 4), mask_id)], dim=1)
    n, total = prompt.shape[1], fed.shape[1]
    q, kv = torch.arange(total)[:, None], torch.arange(total)[None, :]
    mask = ((kv <= q) | (q >= n))[None, None]
    with torch.no_grad():
        logits, _ = model.eval()(fed, attention_mask=mask)
        ref = parent(torch.where(fed == mask_id, 0, fed), attention_mask=mask).logits
    assert torch.equal(logits[:, :n, :vocab], ref[:, :n])


def test_drafter_settings_are_checked():
    with pytest.raises(Ar2dlmError, match="token-shift"):
        ConvertConfig(drafter=True, token_shift=False)
    with pytest.raises(Ar2dlmError, match="fsdp"):
        ConvertConfig(drafter=True, fsdp=True)
    with pytest.raises(Ar2dlmError, match="drafter-target"):
        ConvertConfig(drafter=True, drafter_target="logits")
    assert ConvertConfig(drafter=True, lora_rank=8).lora_rank == 8
    with pytest.raises(Ar2dlmError, match="answers-from-parent"):
        ConvertConfig(drafter=True, answers_from_parent=True, data="self")


def test_drafter_trains_on_the_parents_answers(setup, tmp_path, monkeypatch):
    """--answers-from-parent: the parent answers the data's questions once (cached), and training reads those."""
    base, data, root = setup
    monkeypatch.setenv("AR2DLM_CACHE", str(tmp_path / "cache"))
    cfg = ConvertConfig(drafter=True, model=str(base), data=str(data), output=str(tmp_path / "run"), seq_len=48,
                        batch_size=4, heldout=2, max_steps=1, warmup_steps=1, device="cpu", lora_rank=4,
                        answers_from_parent=True, self_answer_temperature=0.8, self_max_new_tokens=6,
                        max_records=10)
    run(cfg)
    [corpus] = (tmp_path / "cache" / "parent-answers").glob("*.jsonl")
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert 0 < len(records) <= 10
    assert all(r["messages"][0]["content"].startswith("Question ") for r in records)
    assert not any(r["messages"][-1]["content"] in QA_ANSWERS for r in records)  # the parent's words, not the data's


def test_init_drafter_continues_where_a_saved_one_ended(setup):
    base, data, root = setup
    first = run(ConvertConfig(drafter=True, model=str(base), data=str(data), output=str(root / "first"), seq_len=48,
                              batch_size=4, heldout=8, max_steps=4, warmup_steps=1, lr=1e-2, device="cpu",
                              lora_rank=8))
    more = ConvertConfig(drafter=True, model=str(base), data=str(data), output=str(root / "more"), seq_len=48,
                         batch_size=4, heldout=8, max_steps=2, warmup_steps=1, lr=1e-2, device="cpu", lora_rank=8,
                         init_drafter=str(root / "first" / "model"))
    again = run(more)
    assert again["heldout_before"] == first["heldout_after"]  # it starts from the saved weights
    assert again["drafter"]["before"] == first["drafter"]["after"]
    with pytest.raises(Ar2dlmError, match="lora-rank 8, this run 4"):
        run(dataclasses.replace(more, output=str(root / "bad"), lora_rank=4))
    with pytest.raises(Ar2dlmError, match="not a drafter"):
        run(dataclasses.replace(more, output=str(root / "bad2"), init_drafter=str(root)))
    with pytest.raises(Ar2dlmError, match="needs --drafter"):
        ConvertConfig(init_drafter="smollm2-135m-dlm")


def adapter(folder: Path) -> dict:
    return load_file(folder / DRAFTER_WEIGHTS_FILE)


def test_killed_drafter_run_resumes_exactly(setup):
    base, data, root = setup
    extra = ["--drafter-target", "distribution", "--drafter-masking", "schedule"]  # the noise RNG must resume too
    straight = root / "straight"
    res = cli(args(base, data, straight, 6, extra))
    assert res.returncode == 0, res.stderr[-2000:]
    killed = root / "killed"
    res = cli(args(base, data, killed, 6, extra), env_extra={"AR2DLM_FAULT_AT_STEP": "3"})
    assert res.returncode != 0 and not (killed / "model").exists()
    res = cli(args(base, data, killed, 6, [*extra, "--resume"]))
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = adapter(straight / "model"), adapter(killed / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    summaries = [json.loads((d / "summary.json").read_text()) for d in (straight, killed)]
    assert summaries[0]["heldout_before"] == summaries[1]["heldout_before"]  # kept in the checkpoint
    assert summaries[0]["drafter"]["target"] == "distribution"
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 7))


def test_ddp_drafter_ranks_stay_in_sync(setup):
    """Every adapter weight gets a gradient on every rank each step (DDP refuses unused parameters)."""
    base, data, root = setup
    out = root / "ddp"
    res = cli(args(base, data, out, 3), torchrun=2)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    sums = summary["rank_param_checksums"]
    assert summary["world_size"] == 2 and len(sums) == 2 and sums[0] == sums[1]
    assert summary["drafter"]["anchors"] > 0
