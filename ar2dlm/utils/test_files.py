"""Output paths: a path that cannot be written is an Ar2dlmError (before the work, or at the write), never a
traceback, and no temp file is left behind."""

import pytest

from ar2dlm.errors import Ar2dlmError
from ar2dlm.utils.files import atomic_write, check_output_dir, check_output_file, write_json


def test_check_output_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    check_output_file(None, "--json-out")
    check_output_file(tmp_path / "r.json", "--json-out")
    check_output_file(tmp_path / "new" / "deeper" / "r.json", "--json-out")  # missing folders get made
    with pytest.raises(Ar2dlmError, match="--json-out .* is a folder"):
        check_output_file(tmp_path, "--json-out")
    with pytest.raises(Ar2dlmError, match="a_file is a file, not a folder"):
        check_output_file(tmp_path / "a_file" / "sub" / "r.json", "--json-out")


def test_check_output_dir(tmp_path):
    (tmp_path / "a_file").write_text("x")
    check_output_dir(tmp_path, "--output")
    check_output_dir(tmp_path / "new" / "run", "--output")
    with pytest.raises(Ar2dlmError, match="is a file; name a folder"):
        check_output_dir(tmp_path / "a_file", "--output")
    with pytest.raises(Ar2dlmError, match="a_file is a file, not a folder"):
        check_output_dir(tmp_path / "a_file" / "run", "--output")


def test_atomic_write_to_an_impossible_path_is_one_error_and_leaves_nothing(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(Ar2dlmError, match="cannot write"):
        write_json(tmp_path / "a_file" / "r.json", {"x": 1})
    with pytest.raises(Ar2dlmError, match="cannot write"):
        write_json(tmp_path / "a_dir", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]  # no temp file left
    assert list((tmp_path / "a_dir").iterdir()) == []
    with pytest.raises(ValueError):  # an error of the content itself is not rewritten
        with atomic_write(tmp_path / "ok.txt") as f:
            raise ValueError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]
