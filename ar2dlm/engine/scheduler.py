"""The scheduler: a waiting queue and a running batch, stepped one forward at a time (continuous batching at forward
boundaries).

Each step it admits waiting requests, first come first served, while the KV-cache pool has free rows; plans one
forward; and the engine retires finished requests right after it, freeing their rows for the next step.

A forward is either a *prefill* forward, over requests that have not run yet (their first forward feeds the whole
prompt, up to hundreds of positions), or a *decode* forward, over the others (a block or two each). Batching the two
together would pad every decoding row to the prompt's length; so they alternate: a prefill forward when new requests
are waiting for one and the previous forward was not a prefill (or nothing else runs), else a decode forward. Neither
kind starves the other. A prefill forward takes new requests in arrival order while the padded query count (rows x
longest fed range) stays within `max_fed_tokens` (always at least one request).

A request's tokens and NFE depend only on its own forwards, so a request decodes the same tokens whatever runs
beside it and whenever it joins (greedy; with sampling, its own seeded generator gives the same draws). One exception:
`verify` with `draft_len` auto chooses its draft lengths from the engine's shared acceptance statistics and the batch
size, so its NFE, and under sampling which sample a seed gives (always from the AR model's distribution), depend on
what ran before and beside it; its greedy tokens do not. Fix the draft length for reproducible seeded samples.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ar2dlm.engine.blocks import Plan
from ar2dlm.engine.kv_cache import KVCachePool
from ar2dlm.engine.request import Request, Status
from ar2dlm.errors import Ar2dlmError


@dataclass(frozen=True)
class SchedulerLimits:
    max_running: int = 16  # requests decoded together (cache-pool rows)
    max_fed_tokens: int = 4096  # padded query positions of a prefill forward (a single prompt may exceed it)

    def __post_init__(self):
        if self.max_running < 1 or self.max_fed_tokens < 1:
            raise Ar2dlmError("max_running and max_fed_tokens must be >= 1")


@dataclass
class ScheduledForward:
    """One planned forward: cache rows [row_start, row_start + len(rows)), each with its request and plan (None:
    the row is inside the range but does not take part, it only pads)."""

    row_start: int
    rows: list[tuple[Request, Plan | None]]
    prefill: bool

    @property
    def members(self) -> list[tuple[Request, Plan]]:
        return [(r, p) for r, p in self.rows if p is not None]


class Scheduler:
    def __init__(self, limits: SchedulerLimits, cache: KVCachePool):
        self.limits, self.cache = limits, cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i] holds cache row i
        self._last_prefill = False

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------------ admission
    def admit(self) -> None:
        while self.waiting and self.cache.free_rows:
            req = self.waiting.popleft()
            req.row = self.cache.allocate()
            req.status = Status.RUNNING
            self.cache.reserve(req.state.slot_limit + 1)  # + the slot dummy queries may use
            self.running.append(req)

    def retire(self, request: Request) -> None:
        """Take a finished (or cancelled) request out and free its cache row at once."""
        if request in self.waiting:
            self.waiting.remove(request)
            return
        if request.row is None:
            return
        row, last = request.row, self.running[-1]
        # Slots from a request's first uncached one on are rewritten before they are read: copy only the cached.
        moved = self.cache.free(row, last.state.cached)
        if moved is not None:
            self.running[row] = last
            last.row = row
        self.running.pop()
        request.row = None

    # ------------------------------------------------------------------------------------------ planning
    def schedule(self) -> ScheduledForward | None:
        new = [r for r in self.running if r.state.nfe == 0]
        old = [r for r in self.running if r.state.nfe > 0]
        if new and (not old or not self._last_prefill):
            chosen, prefill = self._prefill_group(new), True
        elif old:
            chosen, prefill = old, False
        else:
            return None
        self._last_prefill = prefill
        plans = {id(r): r.state.plan() for r in chosen}
        lo = min(r.row for r in chosen)
        hi = max(r.row for r in chosen) + 1
        rows = [(r, plans.get(id(r))) for r in self.running[lo:hi]]
        return ScheduledForward(lo, rows, prefill)

    def _prefill_group(self, new: list[Request]) -> list[Request]:
        """New requests in arrival order while rows x longest fed range stays within the budget."""
        group, widest = [], 0
        for req in sorted(new, key=lambda r: r.t_arrival):
            width = max(widest, req.state.plan().fed)
            if group and width * (len(group) + 1) > self.limits.max_fed_tokens:
                break
            group.append(req)
            widest = width
        return group
