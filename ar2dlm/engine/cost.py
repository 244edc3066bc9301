"""The cost of one engine forward as a function of how many positions it feeds (its width).

Draft-and-verify and block diffusion both trade wider forwards for fewer of them, so what they gain depends on the
hardware's cost curve: on a GPU a forward of 8-32 positions costs about one position's, on a CPU the thin matmuls of
a wide forward run far below the narrow one's speed. `forward_cost` measures the curve through the engine's own model
runner and KV-cache pool (a cached context, then one forward feeding `width` positions and reading all their logits,
as the verify policy does), so the numbers are the engine's, not a bare model call's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from ar2dlm.engine.plan import Plan
from ar2dlm.engine.runner import ModelRunner


class _Sequence:
    """The minimal sequence state the runner reads: token ids by position and the cached length."""

    def __init__(self, toks: list[int], cached: int):
        self.toks, self.cached = toks, cached


def forward_cost(dlm, widths: Sequence[int] = (1, 2, 4, 8, 16, 32), context: int = 200, repeats: int = 5,
                 seed: int = 0, linear_kernel: str = "auto", fused: bool = True) -> dict[int, float]:
    """Median seconds of one forward feeding `width` new positions after `context` cached ones, per width, with the
    model's linear layers on `linear_kernel` and the fused or Hugging Face decoder forward (see ModelRunner)."""
    costs = shape_cost(dlm, [(width, 0) for width in widths], context, repeats, seed, linear_kernel, fused)
    return {width: seconds for (width, _), seconds in costs.items()}


@torch.no_grad()
def shape_cost(dlm, shapes: Sequence[tuple[int, int]], context: int = 200, repeats: int = 5, seed: int = 0,
               linear_kernel: str = "auto", fused: bool = True, rows: int = 1) -> dict[tuple[int, int], float]:
    """`forward_cost` per (width, masks) shape: the last `masks` of the fed positions hold the mask token (a verify
    forward's mask block, which a gated drafter's adapter runs on); `rows` sequences feed it side by side (a batch of
    running requests)."""
    runner = ModelRunner(dlm, linear_kernel, fused)
    vocab = dlm.backbone.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    longest = max(width for width, _ in shapes)
    toks = torch.randint(0, vocab - 1, (context + longest,), generator=gen).tolist()
    cache = runner.new_cache(rows)
    cache.reserve(context + longest + 1)
    for _ in range(rows):
        cache.allocate()
    runner.forward(cache, 0, [(_Sequence(toks, 0), Plan(0, context, 0, [context - 1],
                                                          groups=list(range(context))))] * rows)
    costs = {}
    for width, n_masks in shapes:
        state = _Sequence(toks[:context + width - n_masks] + [dlm.config.mask_token_id] * n_masks, context)
        plan = Plan(context, context + width, context, list(range(context, context + width)),
                    groups=list(range(context, context + width)))
        times = []
        for _ in range(repeats + 1):  # the first call warms up this shape
            if dlm.device.type == "cuda":
                torch.cuda.synchronize(dlm.device)
            t0 = time.perf_counter()
            runner.forward(cache, 0, [(state, plan)] * rows)
            if dlm.device.type == "cuda":
                torch.cuda.synchronize(dlm.device)
            times.append(time.perf_counter() - t0)
        costs[(width, n_masks)] = statistics.median(times[1:])
    return costs


@torch.no_grad()
def drafter_cost(runner: ModelRunner, rows: int = 1, repeats: int = 5, seed: int = 0) -> float:
    """Median seconds of one feature-drafter call (`ModelRunner.draft`) drafting a full block for `rows` sequences
    with full context windows."""
    dlm = runner.dlm
    gen = torch.Generator().manual_seed(seed)
    contexts = [torch.randn(runner.feature_window, dlm.feature_dim, generator=gen).to(dlm.device)] * rows
    anchors = [0] * rows
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if dlm.device.type == "cuda":
            torch.cuda.synchronize(dlm.device)
        t0 = time.perf_counter()
        runner.draft(contexts, anchors, dlm.config.block_size - 1)
        if dlm.device.type == "cuda":
            torch.cuda.synchronize(dlm.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])
