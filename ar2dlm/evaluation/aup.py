"""AUP (Accuracy Under Parallelism), the d3LLM score for a decoder's accuracy/parallelism trade-off.

Given one method's operating points (rho_i = tokens per forward, TPF; y_i = accuracy in %) on one task:

  * sort by rho (ties: higher accuracy first, so the result does not depend on the input order; the d3LLM
    reference keeps the input order there);
  * keep only points with y_i >= y_1 - 5, where y_1 is the accuracy of the lowest-TPF point (regimes of heavy
    accuracy loss are not credited; the reference asserts instead of dropping, its paper text says "included");
  * AUP = rho_1 * y_1 + sum_{i>=2} 0.5 * (rho_i - rho_{i-1}) * (y_i W(y_i) + y_{i-1} W(y_{i-1})),
    W(y) = min(exp(-alpha * (1 - y / y_max)), 1), alpha = 3, y_max = the best accuracy of any method on the task.

An AR model (one point at TPF 1) scores its accuracy. The first term is deliberately unweighted, as in d3LLM.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ar2dlm.errors import Ar2dlmError

DEFAULT_ALPHA = 3.0
DEFAULT_DROP_BELOW = 5.0  # accuracy points below y_1 at which an operating point stops counting


@dataclass(frozen=True)
class AupPoint:
    tpf: float  # tokens per forward (rho)
    accuracy: float  # in percent, [0, 100]


def _as_points(points: Iterable) -> list[AupPoint]:
    out = []
    for i, p in enumerate(points):
        if isinstance(p, AupPoint):
            tpf, acc = p.tpf, p.accuracy
        else:
            try:
                tpf, acc = p
            except (TypeError, ValueError):
                raise Ar2dlmError(f"AUP point {i}: expected (tpf, accuracy), got {p!r}") from None
        try:
            tpf, acc = float(tpf), float(acc)
        except (TypeError, ValueError):
            raise Ar2dlmError(f"AUP point {i}: tpf and accuracy must be numbers, got {p!r}") from None
        if not math.isfinite(tpf) or tpf <= 0:
            raise Ar2dlmError(f"AUP point {i}: tokens per forward must be a positive number, got {tpf}")
        if not math.isfinite(acc) or not 0.0 <= acc <= 100.0:
            raise Ar2dlmError(f"AUP point {i}: accuracy must be a percentage in [0, 100], got {acc}")
        out.append(AupPoint(tpf, acc))
    if not out:
        raise Ar2dlmError("AUP needs at least one (tpf, accuracy) point")
    return out


def aup_weight(accuracy: float, y_max: float, alpha: float = DEFAULT_ALPHA) -> float:
    """W(y) = min(exp(-alpha (1 - y / y_max)), 1): 1 at the best accuracy, decaying exponentially below it."""
    if y_max <= 0:
        return 1.0  # only reachable when every accuracy is 0, where the weight multiplies zeros anyway
    return min(math.exp(-alpha * (1.0 - accuracy / y_max)), 1.0)


def kept_points(points: Iterable, drop_below: float = DEFAULT_DROP_BELOW) -> list[AupPoint]:
    """The points AUP integrates over: sorted by TPF, without those more than `drop_below` under y_1."""
    pts = sorted(_as_points(points), key=lambda p: (p.tpf, -p.accuracy))
    floor = pts[0].accuracy - drop_below
    return [p for p in pts if p.accuracy >= floor]


def aup(points: Iterable, y_max: float | None = None, alpha: float = DEFAULT_ALPHA,
        drop_below: float = DEFAULT_DROP_BELOW) -> float:
    """AUP of one method's (tpf, accuracy) points (tuples or `AupPoint`s) on one task.

    `y_max` is the best accuracy of any method on the task (pass it when comparing methods, so that they share it);
    it defaults to the best accuracy among `points`. A `y_max` below some point's accuracy is allowed: W caps at 1.
    """
    pts = kept_points(points, drop_below)
    if y_max is None:
        y_max = max(p.accuracy for p in _as_points(points))
    elif not (math.isfinite(float(y_max)) and 0.0 < float(y_max) <= 100.0):
        raise Ar2dlmError(f"AUP y_max must be an accuracy in (0, 100], got {y_max}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise Ar2dlmError(f"AUP alpha must be a non-negative number, got {alpha}")
    if not (math.isfinite(drop_below) and drop_below >= 0):
        raise Ar2dlmError(f"AUP drop_below must be a non-negative number, got {drop_below}")
    y_max = float(y_max)
    def weighted(p: AupPoint) -> float:
        return p.accuracy * aup_weight(p.accuracy, y_max, alpha)

    total = pts[0].tpf * pts[0].accuracy  # unweighted, as in d3LLM: an AR model scores its plain accuracy
    for prev, cur in zip(pts, pts[1:]):
        total += 0.5 * (cur.tpf - prev.tpf) * (weighted(cur) + weighted(prev))
    return total


def aup_table(methods: dict[str, Sequence], alpha: float = DEFAULT_ALPHA,
              drop_below: float = DEFAULT_DROP_BELOW) -> dict[str, float]:
    """AUP of several methods on one task, all sharing y_max = the best accuracy any of them reached."""
    if not methods:
        raise Ar2dlmError("AUP table needs at least one method")
    checked = {name: _as_points(pts) for name, pts in methods.items()}
    y_max = max(p.accuracy for pts in checked.values() for p in pts)
    if y_max <= 0:
        return {name: 0.0 for name in checked}
    return {name: aup(pts, y_max=y_max, alpha=alpha, drop_below=drop_below) for name, pts in checked.items()}
