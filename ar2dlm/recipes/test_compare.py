"""`ar2dlm compare`: the side-by-side run on a tiny model, and bad input (one error line and exit 2, before any
model loads)."""

import argparse

import pytest

from ar2dlm.cli import main
from ar2dlm.engine import DecodeParams
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.loading import load_base
from ar2dlm.recipes.compare import LEGEND, CompareConfig, add_arguments, config_from_args, run
from ar2dlm.testing import tiny_base


@pytest.mark.parametrize("extra, message", [
    (["--prompts", "{tmp}/empty.txt"], "no prompts in"),  # used to divide by zero after both models ran
    (["--prompts", "{tmp}/binary.txt"], "cannot read prompts"),
    (["--prompts", "{tmp}/missing.txt"], "cannot read prompts"),
    (["--json-out", "{tmp}"], "--json-out"),
    (["--thresholds", "0.9,x"], "--thresholds"),
])
def test_compare_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    extra = [a.format(tmp=tmp_path) for a in extra]
    assert main(["compare", "--model", str(tmp_path / "no-such-dlm"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ar2dlm: error: ") and message in err[0], err


def test_bad_thresholds():
    with pytest.raises(Ar2dlmError):
        CompareConfig(thresholds="0.9,abc")
    with pytest.raises(Ar2dlmError):
        CompareConfig(thresholds="1.2")


def test_compare_runs_side_by_side(tmp_path, capsys):
    base = tiny_base(tmp_path)
    model, tok = load_base(str(base))
    dlm = BlockDiffusionLM.from_base(model, tok, block_size=1, base_model=str(base))
    dlm.save_pretrained(tmp_path / "dlm", tok)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown fox\n\nwhat is 2 + 2?\n")
    result = run(CompareConfig(model=str(tmp_path / "dlm"), prompts=str(prompts), thresholds="0.9",
                               decode=DecodeParams(max_new_tokens=8), json_out=str(tmp_path / "cmp.json")))
    s = result["summary"]["per_threshold"][0]
    # block size 1 without training is the AR model itself: identical answers, one token per forward
    assert s["exact_agreement"] == 1.0 and s["tpf"] == 1.0
    assert (tmp_path / "cmp.json").is_file() and result["summary"]["prompts"] == 2
    assert capsys.readouterr().out.rstrip().endswith(LEGEND)  # every column explained under the table


def test_decoding_options_reach_the_dlm_and_max_new_tokens_defaults_to_96():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--block-parallel", "--max-open-blocks", "2"]))
    assert cfg.decode == DecodeParams(max_new_tokens=96, block_parallel=True, max_open_blocks=2)
    with pytest.raises(SystemExit):  # the policy is threshold, swept by --thresholds
        parser.parse_args(["--policy", "entropy"])
