"""The shared prompts and answer comparisons of compare, bench and eval."""

import pytest

from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.agreement import DEFAULT_PROMPTS, leading_agreement, load_prompts, trim_at_stop


def test_leading_agreement():
    assert leading_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert leading_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert leading_agreement([], []) == 0.0


def test_trim_at_stop_keeps_the_first_stop():
    assert trim_at_stop([5, 6, 2, 2, 2], {2}) == [5, 6, 2]
    assert trim_at_stop([5, 6], {2}) == [5, 6]


def test_load_prompts(tmp_path):
    assert load_prompts(None) == DEFAULT_PROMPTS
    (tmp_path / "p.txt").write_text(" a \n\nb\n", encoding="utf-8")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a", "b"]
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(Ar2dlmError, match="no prompts in"):
        load_prompts(str(tmp_path / "empty.txt"))
