"""The learning-rate schedule: warm-up, cosine decay by steps, and decay that follows a time budget."""

import math

import pytest

from ar2dlm.training.optim import lr_factor, progress


def test_warmup_then_cosine_by_steps():
    assert lr_factor(0, 4, 0.0, 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 0.0, 0.1) == pytest.approx(1.0)
    assert progress(4, 4, 104) == 0.0 and progress(104, 4, 104) == 1.0
    assert lr_factor(54, 4, progress(54, 4, 104), 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(200, 4, progress(200, 4, 104), 0.1) == pytest.approx(0.1)


def test_time_budget_drives_decay_when_it_runs_out_first():
    # 10 of 1000 steps done, but 90% of the time budget spent: the schedule is 90% through its decay
    assert progress(10, 0, 1000, elapsed_s=90, budget_s=100) == pytest.approx(0.9)
    assert progress(10, 0, 1000, elapsed_s=150, budget_s=100) == 1.0
    # steps ahead of time: steps decide
    assert progress(900, 0, 1000, elapsed_s=10, budget_s=100) == pytest.approx(0.9)
    assert progress(10, 0, 1000, elapsed_s=90, budget_s=None) == pytest.approx(0.01)
