import math

import pytest

from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.aup import AupPoint, aup, aup_table, aup_weight, kept_points


def test_single_point_ar_model_scores_its_accuracy():
    assert aup([(1.0, 80.0)]) == pytest.approx(80.0)
    assert aup([AupPoint(2.0, 50.0)]) == pytest.approx(100.0)  # rho_1 * y_1, unweighted


def test_two_points_hand_computed():
    # y_max defaults to 80: W(80) = 1, W(78) = exp(-3 * (1 - 78/80)) = exp(-0.075)
    expected = 1 * 80 + 0.5 * (3 - 1) * (78 * math.exp(-0.075) + 80 * 1.0)
    assert aup([(1, 80), (3, 78)]) == pytest.approx(expected)
    assert aup([(3, 78), (1, 80)]) == pytest.approx(expected)  # input order does not matter


def test_point_more_than_five_below_first_is_dropped_and_curve_bridges_it():
    pts = [(1, 80), (2, 74.9), (3, 79)]
    assert [p.tpf for p in kept_points(pts)] == [1, 3]
    expected = 80 + 0.5 * (3 - 1) * (79 * math.exp(-3 * (1 - 79 / 80)) + 80)
    assert aup(pts) == pytest.approx(expected)
    # exactly 5 below is kept
    assert [p.tpf for p in kept_points([(1, 80), (2, 75)])] == [1, 2]


def test_threshold_is_relative_to_lowest_tpf_point_not_best():
    # y_1 = 70 (lowest TPF), so 66 is kept although it is 14 below the best point
    pts = [(1, 70), (2, 80), (3, 66)]
    assert [p.tpf for p in kept_points(pts)] == [1, 2, 3]
    w = lambda y: min(math.exp(-3 * (1 - y / 80)), 1)  # noqa: E731
    expected = 70 + 0.5 * 1 * (80 * w(80) + 70 * w(70)) + 0.5 * 1 * (66 * w(66) + 80 * w(80))
    assert aup(pts) == pytest.approx(expected)


def test_weight_caps_at_one_when_y_max_given_lower_than_points():
    assert aup_weight(90, 70) == 1.0
    assert aup([(1, 80), (2, 78)], y_max=70) == pytest.approx(80 + 0.5 * (78 + 80))


def test_y_max_given_higher_than_points_penalises_every_trapezoid():
    expected = 80 + 0.5 * 1 * (78 * math.exp(-3 * (1 - 0.78)) + 80 * math.exp(-3 * (1 - 0.80)))
    assert aup([(1, 80), (2, 78)], y_max=100) == pytest.approx(expected)


def test_alpha_zero_is_plain_area():
    assert aup([(1, 50), (3, 50)], alpha=0) == pytest.approx(50 + 0.5 * 2 * 100)


def test_table_shares_y_max_across_methods():
    table = aup_table({"ar": [(1, 90)], "dlm": [(1, 80), (2, 80)]})
    assert table["ar"] == pytest.approx(90)
    w = math.exp(-3 * (1 - 80 / 90))
    assert table["dlm"] == pytest.approx(80 + 0.5 * (80 * w + 80 * w))


def test_all_zero_accuracy():
    assert aup([(1, 0), (4, 0)]) == 0.0
    assert aup_table({"a": [(1, 0)]}) == {"a": 0.0}


@pytest.mark.parametrize("points", [[], [(0, 50)], [(-1, 50)], [(1, -0.1)], [(1, 100.5)], [(1, float("nan"))],
                                    [(1,)], ["x"], [("a", 3)]])
def test_invalid_points_raise(points):
    with pytest.raises(Ar2dlmError):
        aup(points)


@pytest.mark.parametrize("kwargs", [{"y_max": 0}, {"y_max": 120}, {"alpha": -1}, {"drop_below": -2}])
def test_invalid_parameters_raise(kwargs):
    with pytest.raises(Ar2dlmError):
        aup([(1, 50)], **kwargs)
