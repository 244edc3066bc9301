"""`ar2dlm ppl` on tiny random models: the AR number against Hugging Face's loss, the results file, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ar2dlm.cli import main
from ar2dlm.evaluation.test_likelihood import DOCS, files  # noqa: F401 (`files` is a shared fixture)
from ar2dlm.model.loading import load_base
from ar2dlm.recipes.ppl import PplConfig, load_sequences, run


def test_ar_ppl_equals_hugging_face_loss_on_the_scored_tokens(files, tmp_path):
    # chat records: only the response is scored; the HF loss ignores the same positions via labels = -100
    parent, tok = load_base(str(files["base"]))
    res = run(PplConfig(model=str(files["dlm4"]), data=str(files["chat"]), seq_len=64, samples=2,
                        output=str(tmp_path / "ppl.json")))
    examples, _ = load_sequences(PplConfig(model="-", data=str(files["chat"]), seq_len=64), tok)
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e.input_ids])
        labels = torch.where(torch.tensor([e.maskable]), ids, torch.full_like(ids, -100))
        n = int(labels[0, 1:].ne(-100).sum())
        with torch.no_grad():
            total += float(parent.eval()(input_ids=ids, labels=labels).loss) * n
        count += n
    assert res["scored_tokens"] == count < sum(len(e.input_ids) for e in examples)
    assert res["ar"]["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert res["ar"]["nll_per_token"] == pytest.approx(total / count, rel=1e-5)


# ------------------------------------------------------------------------------------------------ CLI
def _ppl(files, out, *extra, model="dlm4"):
    return main(["ppl", "--model", str(files[model]), "--data", str(files["text"]), "--seq-len", "16",
                 "--samples", "3", "--output", str(out), *extra])


def test_cli_writes_results_json(files, tmp_path, capsys):
    out = tmp_path / "res" / "ppl.json"
    assert _ppl(files, out) == 0
    res = json.loads(out.read_text())
    assert res["schema"] == "ar2dlm.ppl/1" and res["base"] == str(files["base"]) and res["sequences"] >= 3
    n = res["sequences"]  # packed chunks of 16 tokens (the last may be shorter), position 0 never scored
    assert 15 * (n - 1) + 7 <= res["scored_tokens"] <= 15 * n
    assert res["data_stats"]["text_records"] == len(DOCS) and res["data_stats"]["packed_chunks"] == res["sequences"]
    d, a = res["dlm"], res["ar"]
    assert d["block_size"] == 4 and d["samples"] == 3 and d["is_bound"] and d["stderr_per_token"] > 0
    assert d["ppl_bound"] == pytest.approx(math.exp(d["nelbo_per_token"]))
    assert a["ppl"] == pytest.approx(math.exp(a["nll_per_token"])) and a["nll_total"] > 0
    assert res["gap_nats_per_token"] == pytest.approx(d["nelbo_per_token"] - a["nll_per_token"])
    printed = capsys.readouterr().out
    assert "AR parent:" in printed and "dLM bound (block 4, 3 draws)" in printed
    # a sequence's masks depend on the seed and its index, not on the batch it shares
    out1 = tmp_path / "bs1.json"
    assert _ppl(files, out1, "--batch-size", "1", "--no-ar") == 0
    res1 = json.loads(out1.read_text())
    assert res1["ar"] is None and res1["dlm"]["nelbo_total"] == pytest.approx(d["nelbo_total"], rel=1e-5)


def test_cli_block_size_1_bound_equals_ar(files, tmp_path):
    out = tmp_path / "b1.json"
    assert _ppl(files, out, model="dlm1") == 0
    res = json.loads(out.read_text())
    assert res["dlm"]["nelbo_per_token"] == pytest.approx(res["ar"]["nll_per_token"], rel=1e-5)
    assert res["dlm"]["stderr_per_token"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--data", "/nonexistent/heldout.txt"], "data file not found"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--fixed-t", "1.5"], "fixed t must be in"),
    (["--seq-len", "1000"], "context window"),
])
def test_cli_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys, extra, message):
    rc = _ppl(files, tmp_path / "x.json", *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("ar2dlm: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x.json").exists()


def test_cli_unwritable_output_fails_before_loading(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "x.json", "is a file, not a folder")):
        assert main(["ppl", "--model", str(tmp_path / "no-model"), "--data", "x.txt", "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ar2dlm: error: --output ") and message in err and "\n" not in err, err
