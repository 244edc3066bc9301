"""`--draft-len auto`: the verify policy's draft length, chosen every forward from what a forward costs on this
machine and how many drafts get accepted; 0 (a plain AR forward) when drafting does not pay here.

A sequence is in one of two states before a forward. *With drafts* (the mask block of the last forward drafted
them): a forward checking D drafts commits on average T(D) = 1 + sum_{k<=D} r_1 ... r_k tokens, where r_k is the
chance that draft k is accepted once drafts 1..k-1 were, and keeps drafts for the next forward only if all D were
accepted (chance P = r_1 ... r_D); otherwise the next forward is *without drafts*: it commits 1 token (or checks
prompt-lookup drafts, with `lookup`) and its mask block drafts for the one after. With drafts for every acceptance
length (`every_length`) a sequence always has drafts. The chooser takes the choice (D, and with `lookup` whether
forwards without model drafts look drafts up) that maximises tokens per second over this two-state chain,

    rate = (T(D) + (1 - P) / q * E_free) / (cost_with(D) + (1 - P) / q * cost_free),

with E_free, cost_free and q (the chance of having drafts after a forward without them) from the lookup statistics
(how often a lookup finds drafts, how often they are accepted), or D = 0: plain forwards of 1 position (plus lookup
drafts), which wins on hardware where a wide forward costs much more than a narrow one and the drafts are often
wrong. On a GPU, where forwards of up to 32 positions cost about one position's, it drafts as far as the model was
trained to.

A feature drafter (drafter/feature.py) drafts after every forward in a call of its own, whatever was accepted: its
forwards feed only the clean positions (no mask block), a sequence always has drafts (as with `every_length`), and
a forward that drafts costs its width's forward plus one drafter call (`drafter_cost`, measured per batch-size
bucket as well). With `lookup` it looks drafts up first: a forward where they are found (a share of the forwards
learnt like their acceptance) checks them and needs no drafter call before it, the others check the drafter's.

The costs of the forward shapes involved are measured through the engine's own runner (`cost.shape_cost`), once per
engine on the first request that asks for `auto`, and once more for each batch size (rounded down to a power of two)
the engine runs at: in a batch the rows' positions add up, so on a CPU drafting pays less the more rows run, and
every row's forward is padded to the widest row's (with drafts, or with lookup drafts if any row found some). The
acceptance rates start at a prior (`PRIOR_ACCEPTED` of `PRIOR_OFFERED`) and are updated by every verify forward of
every request in the engine; older forwards count less (each forward scales its counts by `DECAY`, a memory of
about 50 forwards), so the rates follow the prompts being served. Plain forwards teach nothing about the drafts, only
age what is known (`PLAIN_FADE`); once the evidence on the model's first draft is under `MIN_EVIDENCE` forwards (at
the start, or after a few hundred plain forwards) the chooser drafts until it has twice that, then chooses freely.
Forwards that leave lookup out by choice age what is known of its drafts the same way, so a low estimate (a stretch
of text lookup did not suit) is tried again rather than kept for good. A feature drafter's evidence ages at `DECAY`
in forwards without its drafts, not `PLAIN_FADE`: trying its drafts again costs one drafter call and a few positions
more, and a dozen forwards at the start of an answer are a small sample to give up on them for hundreds of forwards.
While exploring, its forwards may look drafts up first (where lookup finds none, the drafter's are checked).
"""

from __future__ import annotations

from typing import NamedTuple

PRIOR_ACCEPTED, PRIOR_OFFERED = 1.0, 2.0  # a draft starts as a coin flip, outweighed after a few forwards
DECAY = 0.98
PLAIN_FADE = 0.997  # what a plain forward (draft length 0) does to the model's counts: they age, ~300 forwards
MIN_EVIDENCE = 5.0  # decayed forwards that judged a first model draft, below which the chooser tries drafts again
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


class Choice(NamedTuple):
    drafts: int  # model drafts checked and made per forward (0: a plain forward, no mask block)
    lookup: int  # prompt-lookup drafts a forward checks at most (0: none): without model drafts, or first (feature)


class DraftLengthChooser:
    def __init__(self, max_drafts: int, every_length: bool, cost_of_shapes, lookup: bool = False,
                 drafter_cost=None):
        """`cost_of_shapes(shapes, rows)` returns {shape: seconds} for a set of (width, masks) shapes fed by `rows`
        sequences side by side; it is called once per batch-size bucket (1, 2, 4, 8, ...) the engine runs at. With
        `lookup`, forwards without model drafts may check prompt-lookup drafts: D of them (max_drafts when D = 0),
        or none where they do not pay. `drafter_cost(rows)`: seconds of a feature drafter's call for `rows`
        sequences (None: the drafts come from the forward's own mask block)."""
        self.max_drafts = max_drafts
        self.every_length = every_length or drafter_cost is not None  # a feature drafter always leaves drafts
        self._drafter_cost, self._drafter_costs = drafter_cost, {}
        self._rows = 1
        self._choice: Choice | None = None  # the choice until the next record or batch change (same for every row)
        self.model = Acceptance(max_drafts)  # the model's drafts
        self.looked_up = Acceptance(max_drafts)  # prompt-lookup drafts
        self.lookup_tries = self.lookup_found = 0.0  # forwards that looked drafts up; those that found some
        self.exploring = True  # drafting to learn the model's acceptance, whatever the rates say
        self.lookup = lookup
        # how a forward without the model's drafts (or, left out by choice, lookup's) ages what is known of them
        self.plain_fade = DECAY if drafter_cost is not None else PLAIN_FADE
        lengths = range(max_drafts + 1)
        # lookup drafts as long as the model's (all it may draft when it does not); a feature drafter's may also
        # run to the longest length while its own stay short, since where lookup finds drafts they run long
        longest = {max_drafts} if drafter_cost is not None else set()
        self.choices = [Choice(d, n) for d in lengths for n in ({0, d or max_drafts} | longest if lookup else {0})]
        self._shapes = {self.shape(c.drafts, c.drafts) for c in self.choices} | \
            {self.shape(n, c.drafts) for c in self.choices for n in {0, c.lookup}}
        self._cost_of_shapes, self._costs = cost_of_shapes, {}
        self.cost_at(1)

    def shape(self, checked: int, drafting: int) -> Shape:
        """The (width, masks) shape of a forward checking `checked` drafts and drafting `drafting`."""
        if self._drafter_cost is not None:
            return checked + 1, 0
        return verify_shape(checked, drafting, self.every_length)

    def seconds(self, checked: int, drafting: int, cost: dict[Shape, float]) -> float:
        """What such a forward costs: its shape, and a feature drafter's call when it drafts."""
        seconds = cost[self.shape(checked, drafting)]
        if self._drafter_cost is not None and drafting:
            bucket = 1 << (max(self.rows, 1).bit_length() - 1)
            if bucket not in self._drafter_costs:
                self._drafter_costs[bucket] = self._drafter_cost(bucket)
            seconds += self._drafter_costs[bucket]
        return seconds

    @property
    def rows(self) -> int:
        """Sequences running together (set by the engine before each forward)."""
        return self._rows

    @rows.setter
    def rows(self, rows: int) -> None:
        rows = max(rows, 1)
        if rows != self._rows:
            self._rows, self._choice = rows, None

    def cost_at(self, rows: int) -> dict[Shape, float]:
        """Seconds of a forward of each shape with `rows` rows (rounded down to a power of two), measured once."""
        bucket = 1 << (max(rows, 1).bit_length() - 1)
        if bucket not in self._costs:
            self._costs[bucket] = self._cost_of_shapes(self._shapes, bucket)
        return self._costs[bucket]

    def _free_forward(self, choice: Choice, cost: dict[Shape, float]) -> tuple[float, float, float]:
        """(tokens, seconds, chance of having model drafts after it) of a forward without model drafts. A batch's
        forward is as wide as its widest row: it checks lookup drafts if any of its rows found some."""
        found = (self.lookup_found + 0.5) / (self.lookup_tries + 1.0) if choice.lookup else 0.0
        any_found = 1 - (1 - found) ** self.rows
        tokens, all_accepted = self.looked_up.expected(choice.lookup)
        seconds = (1 - any_found) * self.seconds(0, choice.drafts, cost) + \
            any_found * self.seconds(choice.lookup, choice.drafts, cost)
        return 1 + found * (tokens - 1), seconds, (1 - found) + found * all_accepted

    def rate(self, choice: Choice) -> float:
        """Expected tokens per second of one sequence decoding with this choice (the two-state chain above; in a
        batch every row's forward costs what the widest row's does, one with drafts)."""
        cost = self.cost_at(self.rows)
        free_tokens, free_seconds, to_drafts = self._free_forward(choice, cost)
        if choice.drafts == 0:
            return free_tokens / free_seconds
        tokens, kept = self.model.expected(choice.drafts)
        with_seconds = self.seconds(choice.drafts, choice.drafts, cost)
        if self._drafter_cost is not None and choice.lookup:
            return self._lookup_first_rate(choice, tokens, with_seconds, cost)
        if self.rows > 1:
            free_seconds = with_seconds
        free_per_with = 0.0 if self.every_length else (1 - kept) / max(to_drafts, 1e-9)
        return (tokens + free_per_with * free_tokens) / (with_seconds + free_per_with * free_seconds)

    def _lookup_first_rate(self, choice: Choice, model_tokens: float, model_seconds: float,
                           cost: dict[Shape, float]) -> float:
        """A feature drafter with lookup: a forward checks lookup drafts where they are found (no drafter call
        before it), the drafter's otherwise. In a batch the forward is as wide as its widest row (the lookup drafts'
        width if any row found some) and the drafter is called for the rows that found none."""
        found = (self.lookup_found + 0.5) / (self.lookup_tries + 1.0)
        lookup_tokens, _ = self.looked_up.expected(choice.lookup)
        tokens = found * lookup_tokens + (1 - found) * model_tokens
        if self.rows == 1:
            return tokens / (found * self.seconds(choice.lookup, 0, cost) + (1 - found) * model_seconds)
        any_found = 1 - (1 - found) ** self.rows
        wide = self.seconds(max(choice.lookup, choice.drafts), choice.drafts, cost)
        return tokens / (any_found * wide + (1 - any_found) * model_seconds)

    def choose(self) -> Choice:
        if self._choice is None:
            evidence = self.model.offered[0]
            if evidence < MIN_EVIDENCE:
                self.exploring = True
            elif evidence >= 2 * MIN_EVIDENCE:
                self.exploring = False
            # exploring drafts without lookup: a forward with partly accepted lookup drafts yields no model drafts
            # (its mask block assumed them all), so lookup could starve the evidence exploring waits for; a feature
            # drafter's drafts are checked wherever lookup finds none, so it may look up first
            allowed = [c for c in self.choices if not self.exploring or (
                c.drafts and (not c.lookup or self._drafter_cost is not None))]
            self._choice = max(allowed, key=self.rate)
        return self._choice

    def record(self, checked: int, accepted: int, model_drafts: bool, looked_up: bool = False,
               plain: bool = False) -> None:
        """One forward checked `checked` drafts (the model's, or else prompt lookup's, if any) and accepted the
        first `accepted` of them; `looked_up`: it looked for lookup drafts; `plain`: it ran at draft length 0."""
        choice, self._choice = self._choice, None
        fade = self.plain_fade ** (1 / self.rows)  # per forward of the batch, not per row: a batch of 16 should
        if model_drafts:  # not retry drafts 16 times sooner
            self.model.decay()
            self.model.add(checked, accepted)
        elif plain:
            self.model.decay(fade)
        if self.lookup and not looked_up and choice is not None and choice.lookup == 0:
            self.looked_up.decay(fade)  # lookup left out by choice: its rates drift back to the prior
        if looked_up:  # (a feature drafter looks first and checks its model's drafts where lookup found none)
            self.looked_up.decay()
            self.lookup_tries, self.lookup_found = self.lookup_tries * DECAY, self.lookup_found * DECAY
            self.lookup_tries += 1
            if checked and not model_drafts:
                self.lookup_found += 1
                self.looked_up.add(checked, accepted)
