"""`--draft-len auto`: the verify policy's draft length, chosen every forward from what a forward costs on this
machine and how many drafts get accepted; 0 (a plain AR forward) when drafting does not pay here.

A sequence is in one of two states before a forward. *With drafts* (the mask block of the last forward drafted
them): a forward checking D drafts commits on average T(D) = 1 + sum_{k<=D} r_1 ... r_k tokens, where r_k is the
chance that draft k is accepted once drafts 1..k-1 were, and keeps drafts for the next forward only if all D were
accepted (chance P = r_1 ... r_D); otherwise the next forward is *without drafts*: it commits 1 token (or checks
prompt-lookup drafts, with `lookup`) and its mask block drafts for the one after. With drafts for every acceptance
length (`every_length`) a sequence always has drafts. The chooser takes the D that maximises tokens per second over
this two-state chain,

    rate(D) = (T(D) + (1 - P) / q * E_free(D)) / (cost_with(D) + (1 - P) / q * cost_free(D)),

with E_free, cost_free and q (the chance of having drafts after a forward without them) from the lookup statistics,
or D = 0: plain forwards of 1 position (plus lookup drafts), which wins on hardware where a wide forward costs much
more than a narrow one and the drafts are often wrong. On a GPU, where forwards of up to 32 positions cost about
one position's, it drafts as far as the model was trained to.

The costs of the forward shapes involved are measured once per engine, through the engine's own runner
(`cost.forward_cost`), on the first request that asks for `auto`. The acceptance rates start at a prior
(`PRIOR_ACCEPTED` of `PRIOR_OFFERED`) and are updated by every verify forward of every request in the engine; older
forwards count less (each forward scales all counts by `DECAY`, a memory of about 50 forwards), so the rates follow
the prompts being served. Plain forwards teach nothing about the drafts, only age what is known (`PLAIN_FADE`); once
the evidence on the model's first draft is under `MIN_EVIDENCE` forwards (at the start, or after a few hundred plain
forwards) the chooser drafts until it has twice that, then chooses freely again.
"""

from __future__ import annotations

PRIOR_ACCEPTED, PRIOR_OFFERED = 1.0, 2.0  # a draft starts as a coin flip, outweighed after a few forwards
DECAY = 0.98
PLAIN_FADE = 0.995  # what a plain forward (draft length 0) does to the model's counts: they age, ~200 forwards
MIN_EVIDENCE = 8.0  # decayed forwards that judged a first model draft, below which the chooser tries drafts again
COST_CONTEXT = 128  # cached positions of the cost measurement (the curve barely depends on it)

Shape = tuple[int, int]  # (positions a forward feeds, mask positions among them)


def verify_shape(checked: int, drafting: int, every_length: bool) -> Shape:
    """The forward that checks `checked` drafts and drafts `drafting` next: the last committed token, the drafts,
    and a block of `drafting` + 1 masks (one per acceptance length 0..checked with `every_length`; none when
    `drafting` is 0)."""
    masks = 0 if drafting == 0 else (drafting + 1) * (checked + 1 if every_length else 1)
    return checked + 1 + masks, masks


def verify_width(drafts: int, every_length: bool) -> int:
    """Positions one verify forward feeds when it checks `drafts` drafts and drafts as many next."""
    return verify_shape(drafts, drafts, every_length)[0]


class Acceptance:
    """Decayed counts of drafts judged at each position: offered[k] counts forwards where draft k + 1 was judged
    (drafts 1..k accepted), accepted[k] those where it was accepted."""

    def __init__(self, max_drafts: int):
        self.offered = [0.0] * max_drafts
        self.accepted = [0.0] * max_drafts

    def decay(self, factor: float = DECAY) -> None:
        self.offered = [o * factor for o in self.offered]
        self.accepted = [a * factor for a in self.accepted]

    def add(self, checked: int, accepted: int) -> None:
        for k in range(min(accepted + 1, checked, len(self.offered))):
            self.offered[k] += 1
            self.accepted[k] += k < accepted

    def rates(self) -> list[float]:
        return [(a + PRIOR_ACCEPTED) / (o + PRIOR_OFFERED) for a, o in zip(self.accepted, self.offered)]

    def expected(self, drafts: int) -> tuple[float, float]:
        """(tokens a forward checking `drafts` drafts commits on average, chance all of them are accepted)."""
        total, reach = 1.0, 1.0
        for r in self.rates()[:drafts]:
            reach *= r
            total += reach
        return total, reach


class DraftLengthChooser:
    def __init__(self, max_drafts: int, every_length: bool, cost_of_shapes, lookup: bool = False):
        """`cost_of_shapes(shapes)` returns {shape: seconds} for a set of (width, masks) shapes; it is called once.
        With `lookup`, forwards without model drafts check up to D prompt-lookup drafts (max_drafts when D = 0)."""
        self.max_drafts, self.every_length, self.lookup = max_drafts, every_length, lookup
        self.model = Acceptance(max_drafts)  # the model's drafts
        self.looked_up = Acceptance(max_drafts)  # prompt-lookup drafts
        self.free_forwards = self.lookup_found = 0.0  # forwards without model drafts; those that found lookup drafts
        self.exploring = True  # drafting to learn the model's acceptance, whatever the rates say
        lengths = range(max_drafts + 1)
        self.with_shape = {d: verify_shape(d, d, every_length) for d in lengths}
        self.free_shape = {d: verify_shape(0, d, every_length) for d in lengths}
        self.lookup_shape = {d: verify_shape(self.lookup_len(d), d, every_length) for d in lengths}
        shapes = {*self.with_shape.values(), *self.free_shape.values(), *self.lookup_shape.values()}
        self.cost = cost_of_shapes(shapes)

    def lookup_len(self, drafts: int) -> int:
        """Prompt-lookup drafts checked by a forward without model drafts when the draft length is `drafts`."""
        return drafts if drafts else self.max_drafts

    def _free_forward(self, drafts: int) -> tuple[float, float, float]:
        """(tokens, seconds, chance of having model drafts after it) of a forward without model drafts."""
        found = (self.lookup_found + 0.5) / (self.free_forwards + 1.0) if self.lookup else 0.0
        tokens, all_accepted = self.looked_up.expected(self.lookup_len(drafts))
        seconds = (1 - found) * self.cost[self.free_shape[drafts]] + found * self.cost[self.lookup_shape[drafts]]
        return 1 + found * (tokens - 1), seconds, (1 - found) + found * all_accepted

    def rate(self, drafts: int) -> float:
        """Expected tokens per second of one sequence decoding with this draft length (the two-state chain above)."""
        free_tokens, free_seconds, to_drafts = self._free_forward(drafts)
        if drafts == 0:
            return free_tokens / free_seconds
        tokens, kept = self.model.expected(drafts)
        free_per_with = 0.0 if self.every_length else (1 - kept) / max(to_drafts, 1e-9)
        return (tokens + free_per_with * free_tokens) / (self.cost[self.with_shape[drafts]] +
                                                        free_per_with * free_seconds)

    def choose(self) -> int:
        evidence = self.model.offered[0]
        if evidence < MIN_EVIDENCE:
            self.exploring = True
        elif evidence >= 2 * MIN_EVIDENCE:
            self.exploring = False
        return max(range(1 if self.exploring else 0, self.max_drafts + 1), key=self.rate)

    def record(self, checked: int, accepted: int, model_drafts: bool, plain: bool = False) -> None:
        """One forward checked `checked` drafts (the model's, or else prompt lookup's, if any) and accepted the
        first `accepted` of them; `plain`: it ran at draft length 0."""
        if model_drafts:
            self.model.decay()
            self.model.add(checked, accepted)
            return
        if plain:
            self.model.decay(PLAIN_FADE)
        self.looked_up.decay()
        self.free_forwards, self.lookup_found = self.free_forwards * DECAY, self.lookup_found * DECAY
        self.free_forwards += 1
        if checked:
            self.lookup_found += 1
            self.looked_up.add(checked, accepted)

