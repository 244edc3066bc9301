"""`ar2dlm bench` (decoding speed) on tiny models: rows, measured TPF, agreement with the AR parent, files, errors."""

from __future__ import annotations

import json

import pytest

from ar2dlm.engine import DecodeParams
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.loading import load_base
from ar2dlm.recipes.bench_decode import (AR_METHOD, HF_METHOD, LOOKUP_METHOD, DecodeBenchConfig, parse_batch_sizes,
                                         parse_policy_specs, run)
from ar2dlm.testing import tiny_base

SHORT_ANSWERS = DecodeParams(max_new_tokens=10)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny AR parent, a block-4 dLM made from it, and a block-1 dLM that is the parent itself; a prompts file."""
    tmp = tmp_path_factory.mktemp("decode_bench")
    parent = tiny_base(tmp)
    out = {"parent": parent, "tmp": tmp}
    for block in (4, 1):
        model, tok = load_base(str(parent))
        dlm = BlockDiffusionLM.from_base(model, tok, block_size=block, base_model=str(parent))
        dlm.save_pretrained(tmp / f"dlm{block}", tok)
        out[f"dlm{block}"] = tmp / f"dlm{block}"
    prompts = tmp / "prompts.txt"
    prompts.write_text("the quick brown fox\n\n0 1 2 3 4 5\ndef add(a, b):\n", encoding="utf-8")
    out["prompts"] = prompts
    return out


def _rows(result, method):
    return {r["batch_size"]: r for r in result["rows"] if r["method"] == method}


def test_bench_rows_measured_tpf_agreement_and_files(models, capsys):
    tmp = models["tmp"]
    cfg = DecodeBenchConfig(model=str(models["dlm4"]), prompts=str(models["prompts"]),
                            policies="threshold:0.9,steps:2,verify:2", batch_sizes="1,2", decode=SHORT_ANSWERS,
                            block_parallel_too=True, warmup=1, json_out=str(tmp / "bench.json"),
                            plot_out=str(tmp / "bench.png"))
    result = run(cfg)
    methods = [HF_METHOD, AR_METHOD, "threshold:0.9", "steps:2", "verify:2", "threshold:0.9+bp", "steps:2+bp"]
    assert result["methods"] == methods + [LOOKUP_METHOD]
    assert result["base"] == str(models["parent"])  # the parent recorded in the dLM
    assert {(r["method"], r["batch_size"]) for r in result["rows"]} == \
        {(m, b) for m in methods for b in (1, 2)} | {(LOOKUP_METHOD, 1)}  # HF assisted generation: batch 1 only
    for r in result["rows"]:
        assert r["tokens"] > 0 and r["wall_s"] > 0 and r["tokens_per_s"] > 0, r["method"]
        assert r["nfe"] > 0 and r["calls"] > 0 and len(r["per_prompt"]) == 3
        assert r["vs_hf"] > 0 and r["vs_ar"] > 0

    hf = _rows(result, HF_METHOD)
    for bs, r in hf.items():
        # TPF from the forward hook, not assumed: one forward per generated token and row
        assert r["tpf"] == pytest.approx(1.0)
        assert r["vs_hf"] == pytest.approx(1.0)
    assert hf[1]["calls"] == hf[1]["nfe"] == hf[1]["tokens"]  # one prompt at a time: every call is one row's
    assert hf[2]["calls"] < hf[2]["nfe"]  # two rows share a batched call
    assert hf[1]["exact_agreement"] == 1.0  # the reference itself

    for bs, r in _rows(result, AR_METHOD).items():  # our engine's ar policy on the parent = HF generate greedy
        assert r["exact_agreement"] == 1.0 and r["leading_agreement"] == 1.0, bs
        assert r["tpf"] == pytest.approx(1.0)
        if bs == 1:
            assert r["calls"] == r["nfe"]
        assert r["vs_ar"] == pytest.approx(1.0)
    # lossless methods: prompt lookup on the parent, and verify (this dLM's clean stream is the parent's, sharpened)
    assert _rows(result, LOOKUP_METHOD)[1]["exact_agreement"] == 1.0
    assert all(r["exact_agreement"] == 1.0 for r in _rows(result, "verify:2").values())
    steps = _rows(result, "steps:2")
    assert steps[1]["tpf"] > 1.0 and steps[1]["nfe"] < steps[1]["tokens"]  # two tokens a forward (blocks of 4)
    for r in result["rows"]:  # the engine's batched rows equal their one-at-a-time results
        if r["kind"] == "engine":
            one = _rows(result, r["method"])[1]
            assert [p["tokens"] for p in r["per_prompt"]] == [p["tokens"] for p in one["per_prompt"]]
            assert r["nfe"] == one["nfe"]

    table = capsys.readouterr().out
    assert "tok/s" in table and "TPF" in table and "steps:2+bp" in table
    saved = json.loads((tmp / "bench.json").read_text())
    assert len(saved["rows"]) == 7 * 2 + 1 and saved["prompts"] == ["the quick brown fox", "0 1 2 3 4 5", "def add(a, b):"]
    assert (tmp / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_block_size_one_dlm_of_the_parent_agrees_fully(models, capsys):
    cfg = DecodeBenchConfig(model=str(models["dlm1"]), base=str(models["parent"]), prompts=str(models["prompts"]),
                            policies="threshold:0.9,entropy:0.5", batch_sizes="1,3", decode=SHORT_ANSWERS, warmup=0)
    result = run(cfg)
    assert len(result["rows"]) == 4 * 2 + 1  # + prompt lookup at batch 1
    for method in ("threshold:0.9", "entropy:0.5"):
        for bs, r in _rows(result, method).items():
            assert r["exact_agreement"] == 1.0 and r["leading_agreement"] == 1.0, (method, bs)
            assert r["tpf"] == pytest.approx(1.0)  # one position per block: one token a forward


def test_parse_policy_specs():
    spec = DecodeParams.from_spec
    assert spec("threshold:0.7") == DecodeParams(policy="threshold", tau=0.7)
    assert spec(" entropy:1.5 ") == DecodeParams(policy="entropy", tau=1.5)
    assert spec("steps:3") == DecodeParams(policy="steps", steps_per_forward=3)
    assert spec("threshold").make_policy().tau == 0.9 and spec("entropy").make_policy().tau == 0.5
    assert spec("threshold").label == "threshold:0.9"
    assert spec("ar") == DecodeParams(policy="ar")
    assert spec("entropy:0.5+bp") == DecodeParams(policy="entropy", tau=0.5, block_parallel=True)
    assert parse_policy_specs("steps:3", base=DecodeParams(max_new_tokens=7, p_add=0.3)) == [
        DecodeParams(policy="steps", steps_per_forward=3, max_new_tokens=7, p_add=0.3)]
    specs = parse_policy_specs("threshold:0.9,steps:2,threshold:0.9,ar", block_parallel_too=True)
    assert [s.label for s in specs] == ["threshold:0.9", "steps:2", "ar", "threshold:0.9+bp", "steps:2+bp"]
    assert parse_batch_sizes("1, 8,1") == [1, 8]
    default = DecodeBenchConfig(model="nowhere")  # without --policies: what the model is for
    assert [s.label for s in default.policy_specs()] == ["threshold:0.9", "threshold:0.7", "entropy:0.5"]
    assert [s.label for s in default.policy_specs(drafter=True)] == [
        "verify", "verify:auto+lookup", "verify:auto+all", "threshold:0.9"]


@pytest.mark.parametrize("spec, match", [
    ("threshold:1.5", "in \\[0, 1\\]"), ("threshold:-0.1", "in \\[0, 1\\]"), ("entropy:-1", ">= 0"),
    ("steps:0", "k >= 1"), ("steps:1.5", "is not an integer"), ("threshold:high", "is not a number"),
    ("greedy:1", "unknown"),
    ("ar:1", "no value"), ("threshold:", "no value"), (" , ", "empty"),
])
def test_bad_policy_specs(spec, match):
    with pytest.raises(Ar2dlmError, match=match):
        parse_policy_specs(spec)
    with pytest.raises(Ar2dlmError):  # the config validates before anything loads
        DecodeBenchConfig(model="nowhere", policies=spec)


@pytest.mark.parametrize("kwargs", [{"batch_sizes": "0"}, {"batch_sizes": "1,x"}, {"decode": {"max_new_tokens": 0}},
                                    {"warmup": -1}])
def test_bad_settings(kwargs):
    with pytest.raises(Ar2dlmError):
        DecodeBenchConfig(model="nowhere", **{k: DecodeParams(**v) if k == "decode" else v for k, v in kwargs.items()})


def test_unwritable_outputs_are_refused_before_the_run(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(Ar2dlmError, match="--json-out .* is a folder"):
        DecodeBenchConfig(model="nowhere", json_out=str(tmp_path))
    with pytest.raises(Ar2dlmError, match="--plot-out .* is a file, not a folder"):
        DecodeBenchConfig(model="nowhere", plot_out=str(tmp_path / "a_file" / "p.png"))


def test_cli_errors_are_one_line(models, tmp_path, capsys):
    from ar2dlm.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    cases = [
        (["bench", "--model", str(tmp_path / "missing")], "no dLM folder"),
        (["bench", "--model", str(models["dlm4"]), "--prompts", str(empty)], "no prompts"),
        (["bench", "--model", str(models["dlm4"]), "--prompts", str(tmp_path / "none.txt")], "cannot read prompts"),
        (["bench", "--model", str(models["dlm4"]), "--policies", "threshold:2"], "in [0, 1]"),
        (["bench", "--model", str(models["parent"])], "not a dLM"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ar2dlm: error: ") and message in err[0], (argv, err)


def test_cli_bench_runs(models, tmp_path, capsys):
    from ar2dlm.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "--model", str(models["dlm4"]), "--prompts", str(models["prompts"]), "--policies",
                 "threshold:0.5", "--batch-sizes", "2", "--max-new-tokens", "4", "--warmup", "0",
                 "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == [HF_METHOD, AR_METHOD, "threshold:0.5"]
    # batch size 1 was not run: the reference answers come from an untimed one-at-a-time HF generate pass
    assert _rows(result, AR_METHOD)[2]["exact_agreement"] == 1.0
    assert "ar-engine" in capsys.readouterr().out
