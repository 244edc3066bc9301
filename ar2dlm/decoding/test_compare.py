"""`ar2dlm compare` bad input: one error line and exit 2, before any model loads."""

import pytest

from ar2dlm.cli import main


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
