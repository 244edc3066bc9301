"""`ar2dlm eval` end to end on tiny models and a 4-record GSM8K file (CLI in-process, seconds on a CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ar2dlm.cli import main
from ar2dlm.engine import DecodeParams, Engine, GenerationResult
from ar2dlm.evaluation.aup import aup
from ar2dlm.evaluation.fidelity import completion_nll
from ar2dlm.evaluation.tasks.gsm8k import GSM8K
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.loading import load_base
from ar2dlm.recipes.eval import EvalConfig, parse_sweep
from ar2dlm.testing import tiny_base

GSM = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
       for i in range(4)]
FAST = ["--no-chat", "--max-new-tokens", "8", "--batch-size", "3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = tiny_base(root)
    # A block-4 dLM whose output is sharpened (final-norm gain x50), so that thresholds commit several tokens a
    # forward; and a block-size-1 dLM of the unmodified parent, which must decode exactly like the parent.
    model, tok = load_base(str(base))
    with torch.no_grad():
        model.model.norm.weight.mul_(50.0)
    BlockDiffusionLM.from_base(model, tok, block_size=4, base_model=str(base)).save_pretrained(root / "dlm4", tok)
    model, tok = load_base(str(base))
    BlockDiffusionLM.from_base(model, tok, block_size=1, base_model=str(base)).save_pretrained(root / "dlm1", tok)
    data = root / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM), encoding="utf-8")
    return {"root": root, "base": base, "dlm4": root / "dlm4", "dlm1": root / "dlm1", "data": data}


def _eval(files, out, *extra, model="dlm4", task="gsm8k") -> dict:
    rc = main(["eval", "--model", str(files[model]), "--task", task, "--source", str(files["data"]), "--output",
               str(out), *FAST, *extra])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def sweep_run(files):
    out = files["root"] / "sweep" / "results.json"
    return out, _eval(files, out, "--sweep", "tau=0.3,0.6,1.0", "--baseline-ar")


def test_sweep_gives_one_point_per_value_with_sane_fields(files, sweep_run):
    out, res = sweep_run
    assert res["schema"] == "ar2dlm.eval/1" and res["task"] == "gsm8k" and res["ar2dlm_version"]
    assert res["sweep"] == {"key": "tau", "values": [0.3, 0.6, 1.0]} and res["num_samples"] == 4
    assert [p["prompt"] for p in res["prompts"]] == [f"Question: What is {i} + 1?\nAnswer:" for i in range(4)]
    base, *dlm = res["points"]
    assert base["kind"] == "ar_baseline" and base["block_size"] == 1 and base["decode"]["policy"] == "ar"
    assert base["tpf"] == 1.0 and base["model"] == str(files["base"])
    assert [p["sweep_value"] for p in dlm] == [0.3, 0.6, 1.0] == [p["decode"]["tau"] for p in dlm]
    assert [p["label"] for p in dlm] == ["threshold tau=0.3", "threshold tau=0.6", "threshold tau=1.0"]
    for p in res["points"]:
        assert 0 <= p["accuracy"] <= 100 and p["tokens_per_s"] > 0 and p["seconds"] > 0
        assert p["nfe"] > 0 and p["tokens"] > 0 and p["tpf"] == pytest.approx(p["tokens"] / p["nfe"])
        assert p["decode"]["stop_strings"] == ["Question:"] and p["decode"]["max_new_tokens"] == 8
        assert [s["id"] for s in p["samples"]] == [f"gsm8k/{i}" for i in range(4)]
        assert sum(s["tokens"] for s in p["samples"]) == p["tokens"]
        assert all("correct" in s["score"] and isinstance(s["text"], str) for s in p["samples"])
    assert dlm[0]["tpf"] > dlm[2]["tpf"] >= 1.0  # a lower threshold commits more tokens per forward
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["plot"].endswith(".png")
    assert not (out.parent / "results.json.partial.jsonl").exists()


def test_aup_is_over_all_points_of_the_run(sweep_run):
    _, res = sweep_run
    assert res["aup"] == pytest.approx(aup([(p["tpf"], p["accuracy"]) for p in res["points"]]))


def test_gsm8k_scorer_sees_the_exact_completions(files, tmp_path, monkeypatch):
    seen = {}
    original = GSM8K.score

    def recording(self, sample, completion):
        seen[sample.id] = completion
        return original(self, sample, completion)

    monkeypatch.setattr(GSM8K, "score", recording)
    res = _eval(files, tmp_path / "r.json", "--tau", "0.6")
    point = res["points"][0]
    assert seen == {s["id"]: s["text"] for s in point["samples"]}
    # The same as decoding each prompt alone with the engine.
    dlm, tok = BlockDiffusionLM.from_pretrained(files["dlm4"])
    engine = Engine(dlm, tok)
    cfg = DecodeParams(max_new_tokens=8, tau=0.6, stop_strings=("Question:",))
    for prompt in res["prompts"]:
        assert engine.generate(tok(prompt["prompt"])["input_ids"], cfg).text == seen[prompt["id"]]


def test_accuracy_and_speed_come_from_the_scores_and_results(files, tmp_path, monkeypatch):
    def fake(self, prompts, config=None, **overrides):
        return [GenerationResult([5, 6, 7], "1 + 1 = 2\n#### 1", 2, 0.01, 0.001, "eos", len(p)) for p in prompts]

    monkeypatch.setattr(Engine, "generate_batch", fake)
    point = _eval(files, tmp_path / "r.json")["points"][0]
    assert point["accuracy"] == 25.0  # only record 0 has the answer 1
    assert [s["score"]["correct"] for s in point["samples"]] == [True, False, False, False]
    assert point["tpf"] == 1.5 and point["tokens"] == 12 and point["nfe"] == 8


def test_resume_skips_finished_samples(files, tmp_path, monkeypatch):
    calls = []
    real = Engine.generate_batch

    def counting(self, prompts, config=None, **overrides):
        if fail_at and len(calls) + 1 == fail_at:
            raise RuntimeError("interrupted")
        calls.append(len(prompts))
        return real(self, prompts, config, **overrides)

    monkeypatch.setattr(Engine, "generate_batch", counting)
    out = tmp_path / "r.json"
    args = ["--sweep", "tau=0.3,1.0", "--batch-size", "2"]
    fail_at = 3  # two batches of the first point finish, the first batch of the second fails
    with pytest.raises(RuntimeError, match="interrupted"):
        _eval(files, out, *args)
    partial = tmp_path / "r.json.partial.jsonl"
    assert calls == [2, 2] and len(partial.read_text().splitlines()) == 4 and not out.exists()

    with open(partial, "a") as f:
        f.write('{"point": "torn by a crash mid-wr')  # ignored, and the next record still gets its own line
    calls.clear()
    fail_at = None
    res = _eval(files, out, *args)
    assert calls == [2, 2]  # only the second point was decoded
    assert not partial.exists()
    assert [len(p["samples"]) for p in res["points"]] == [4, 4]
    calls.clear()
    fresh = _eval(files, tmp_path / "fresh.json", *args)
    assert calls == [2, 2, 2, 2]
    for a, b in zip(res["points"], fresh["points"]):
        assert [s["text"] for s in a["samples"]] == [s["text"] for s in b["samples"]]
        assert a["accuracy"] == b["accuracy"] and a["tpf"] == b["tpf"]


def test_fidelity_of_the_parent_wrapped_as_block_size_1_is_exact(files, tmp_path):
    res = _eval(files, tmp_path / "f.json", "--chat", "--baseline-ar", model="dlm1", task="fidelity")
    assert res["prompt_task"] == "gsm8k" and res["base"] == str(files["base"])
    assert res["prompts"][0]["prompt"].startswith("<|im_start|>user\nWhat is 0 + 1?")
    for p in res["points"]:
        assert p["accuracy"] == p["agreement"] == 100.0
        fid = p["fidelity"]
        assert fid["exact_match"] == 1.0 and fid["positional_agreement"] == 1.0 and fid["pairs"] == 4
        assert math.isfinite(fid["parent_nll_per_token"]) and 0 < fid["distinct_1"] <= 1
        assert [s["token_ids"] for s in p["samples"]] == [r["token_ids"] for r in res["parent_outputs"]]
    # The NLL is the parent's own (no mask token row), as fidelity.completion_nll computes it.
    parent, tok = load_base(str(files["base"]))
    sample = res["points"][1]["samples"][0]
    ids = tok(res["prompts"][0]["prompt"], add_special_tokens=False)["input_ids"]
    assert sample["score"]["nll_total"] == pytest.approx(completion_nll(parent, ids, sample["token_ids"]).total,
                                                         rel=1e-4)


def test_fidelity_on_a_text_file_of_prompts(files, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown fox\n\ndef add(a, b):\n0 1 2 3\n", encoding="utf-8")
    rc = main(["eval", "--model", str(files["dlm4"]), "--task", "fidelity", "--source", str(prompts), "--output",
               str(tmp_path / "f.json"), "--sweep", "tau=0.3,1.0", "--limit", "2", *FAST])
    res = json.loads((tmp_path / "f.json").read_text())
    assert rc == 0 and res["prompt_task"] is None and res["metric"] == "exact_match_agreement"
    assert [p["question"] for p in res["prompts"]] == ["the quick brown fox", "def add(a, b):"]
    assert all(p["fidelity"]["pairs"] == 2 and 0 <= p["agreement"] <= 100 for p in res["points"])


def test_parse_sweep():
    assert parse_sweep("tau=0.5,0.7") == ("tau", [0.5, 0.7])
    assert parse_sweep("steps-per-forward=2,4") == ("steps_per_forward", [2, 4])
    assert parse_sweep("policy=threshold,entropy") == ("policy", ["threshold", "entropy"])
    assert parse_sweep("block_parallel=false,true") == ("block_parallel", [False, True])
    assert parse_sweep("tau=none,0.5") == ("tau", [None, 0.5])
    assert parse_sweep(None) == (None, [])
    for bad in ("tau", "=0.5", "tau=", "tau=0.5,,0.7", "tau=a", "steps_per_forward=1.5", "stop_strings=x",
                "tau=0.5,0.5", "bogus=1"):
        with pytest.raises(Ar2dlmError):
            parse_sweep(bad)
    with pytest.raises(Ar2dlmError, match="tau"):  # values the decoder rejects are caught before anything loads
        EvalConfig(model="m", task="gsm8k", sweep="tau=0.5,1.5")


@pytest.mark.parametrize("args, message", [
    (["--task", "mmlu"], "unknown task"),
    (["--sweep", "tau"], "malformed --sweep"),
    (["--sweep", "tau=0.5,x"], "is not a number"),
    (["--sweep", "nope=1,2"], "unknown decode setting"),
    (["--sweep", "policy=threshold,fast"], "unknown decoding policy"),
    (["--model", "{root}/missing"], "not found"),
    (["--source", "{root}/empty.jsonl"], "no samples"),
    (["--task", "fidelity", "--source", "{root}/empty.jsonl"], "no samples"),
    (["--task", "fidelity", "--source", "{root}/nothing.jsonl"], "not found"),
    (["--limit", "0"], "--limit"),
    (["--batch-size", "0"], "--batch-size"),
    (["--plot", "{root}"], "--plot"),  # a folder: was a traceback after the whole evaluation
    (["--output", "{root}/gsm8k.jsonl/r.json"], "is a file, not a folder"),
])
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys, args, message):
    (files["root"] / "empty.jsonl").write_text("")
    argv = {"--model": str(files["dlm4"]), "--task": "gsm8k", "--source": str(files["data"]),
            "--output": str(tmp_path / "r.json")}
    rest = []
    for k, v in zip(args[::2], args[1::2]):
        v = v.format(root=files["root"])
        if k in argv:
            argv[k] = v
        else:
            rest += [k, v]
    capsys.readouterr()
    assert main(["eval", *[x for kv in argv.items() for x in kv], *FAST, *rest]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ar2dlm: error:") and message in err[0], err
    assert not (tmp_path / "r.json").exists()


def test_a_policy_that_does_not_exist_is_refused_by_the_parser(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # --policy has choices: argparse's own usage error, exit 2
        main(["eval", "--model", str(files["dlm4"]), "--task", "gsm8k", "--policy", "fast"])
    assert e.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


def test_decode_options_come_from_decode_params_with_eval_defaults():
    import argparse

    from ar2dlm.recipes.eval import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--model", "m", "--task", "gsm8k", "--activate-ratio", "0.8",
                                              "--max-open-blocks", "2", "--stop", "END"]))
    assert cfg.decode == DecodeParams(max_new_tokens=256, activate_ratio=0.8, max_open_blocks=2, stop_strings=("END",))
    ((_, _, params),) = cfg.points(("Question:",))
    assert params.stop_strings == ("END", "Question:")  # the task's stops join the user's
