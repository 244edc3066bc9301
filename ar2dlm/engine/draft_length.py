"""`--draft-len auto`: the verify policy's draft length, chosen every forward from what a forward costs on this
machine and how many drafts the model gets accepted.

A forward that checks D drafts commits on average T(D) = 1 + sum_{k<=D} r_1 r_2 ... r_k tokens, where r_k is the
chance that draft k is accepted once drafts 1..k-1 were. It feeds w(D) positions: the D + 1 clean ones and D + 1
masks, or (D + 1)^2 masks when drafting for every acceptance length. The chooser takes the D that maximises
T(D) / cost(w(D)): tokens per second of one sequence. On a GPU the cost curve is nearly flat up to 32 positions, so
it drafts as far as the model was trained to; on a CPU, where a forward of 8 positions costs about twice one of 1,
it drafts only as far as acceptance pays for.

The cost curve is measured once per engine, through the engine's own runner (`cost.forward_cost`), on the first
request that asks for `auto`. The acceptance rates start at a prior (`PRIOR_ACCEPTED` of `PRIOR_OFFERED`) and are
updated by every verify forward of every request in the engine; older forwards count less (each forward scales the
counts by `DECAY`, a memory of about 50 forwards), so the rates follow the prompts being served.
"""

from __future__ import annotations

PRIOR_ACCEPTED, PRIOR_OFFERED = 1.0, 2.0  # a draft starts as a coin flip, outweighed after a few forwards
DECAY = 0.98
COST_CONTEXT = 128  # cached positions of the cost measurement (the curve barely depends on it)


def verify_width(drafts: int, every_length: bool) -> int:
    """Positions one verify forward feeds when it checks `drafts` drafts and drafts as many next."""
    return drafts + 1 + ((drafts + 1) ** 2 if every_length else drafts + 1)


class DraftLengthChooser:
    def __init__(self, max_drafts: int, every_length: bool, cost_of_width):
        """`cost_of_width(masks)` returns {width: seconds} for `masks`, {width: mask positions among them}; it is
        called once, with the verify forwards of 1..max_drafts drafts."""
        self.max_drafts, self.every_length = max_drafts, every_length
        widths = {d: verify_width(d, every_length) for d in range(1, max_drafts + 1)}
        costs = cost_of_width({w: w - d - 1 for d, w in widths.items()})  # all but the d + 1 clean positions
        self.cost = {d: costs[w] for d, w in widths.items()}
        self.offered = [0.0] * max_drafts  # forwards where draft k was checked with drafts 1..k-1 accepted
        self.accepted = [0.0] * max_drafts

    def rates(self) -> list[float]:
        return [(a + PRIOR_ACCEPTED) / (o + PRIOR_OFFERED) for a, o in zip(self.accepted, self.offered)]

    def expected_tokens(self, drafts: int) -> float:
        total, reach = 1.0, 1.0
        for r in self.rates()[:drafts]:
            reach *= r
            total += reach
        return total

    def choose(self) -> int:
        return max(range(1, self.max_drafts + 1), key=lambda d: self.expected_tokens(d) / self.cost[d])

    def record(self, checked: int, accepted: int) -> None:
        """One forward checked `checked` drafts and accepted the first `accepted` of them."""
        self.offered = [o * DECAY for o in self.offered]
        self.accepted = [a * DECAY for a in self.accepted]
        for k in range(min(accepted + 1, checked, self.max_drafts)):
            self.offered[k] += 1
            self.accepted[k] += k < accepted
