"""The decoding engine: requests in, one forward per `step`, outputs out (vLLM's layout, for block diffusion).

    engine = Engine(dlm, tokenizer)
    res = engine.generate("What is 2 + 2?", DecodeParams(max_new_tokens=64, policy="threshold", tau=0.9))
    res.text, res.nfe, res.tpf, res.tokens_per_s, res.ttft_s
    for delta in engine.stream(prompt_ids): print(delta, end="")
    engine.generate_batch([ids_a, ids_b])      # rows of any lengths, each equal to its batch-size-1 result

    rid = engine.add_request(ids, params)      # continuous batching: add at any time, step, read outputs
    while engine.has_unfinished():
        for out in engine.step(): print(out.request_id, out.delta, out.finished)
    engine.abort(rid)                          # frees its cache row at once

The parts, each its own module: `request` (a sequence's state), `blocks` (its block schedule: what a forward feeds,
which logits it reads, what is committed), `scheduler` (waiting queue, running batch, prefill/decode forwards),
`kv_cache` (the pool of cache rows), `runner` (ids, positions, masks, the model call, the LM head), `policies`
(which masked positions to commit), `output` (detokenising, stops, streaming). `generate`, `generate_batch` and
`stream` are loops over `add_request` / `step`.

What a forward feeds (see `blocks.py`): the uncached complete blocks (the prompt's on a request's first forward, the
block just finished afterwards) with the open block(s) whose logits are needed, so prefill, the one write of a
finished block's final K/V and the next block's first denoising step share one forward. Every step a request takes
part in counts as one NFE, so with greedy decoding its NFE and tokens equal the no-cache `reference_generate`
exactly, alone or batched, whenever it joined (with stop tokens the engine may stop earlier: it stops as soon as the
decoded prefix holds a stop, not at the end of the block).

"Exactly equal" holds in exact arithmetic: a batched forward attends over a different number of (masked) keys than
the reference, so logits may differ in the last bits and a near-tie could in principle break the other way; the
tests see identical tokens throughout.

Speed (`ar2dlm bench`, SmolLM2-135M, 2-core CPU, 2 threads, 64 new tokens, batch 1): with the fused decoder forward
(`model/fused_decoder.py`) and oneDNN linears the `ar` path runs at ~1.25x Hugging Face `generate` on the same
parent. Anything that feeds more positions per forward (dLM blocks, verify drafts) pays only when it commits more
tokens per forward than a forward of that width costs against a one-token one (`ar2dlm bench-width`).

Not done yet: torch.compile / CUDA graphs (the fed length varies per forward, so shapes are not static); no paged or
shared-prefix cache; in a batch every row attends up to the furthest row's fed end (masked) and a forward feeds as
many queries as its longest row (the others padded).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence

import torch

from ar2dlm.engine.cost import drafter_cost, shape_cost
from ar2dlm.engine.draft_length import COST_CONTEXT, DraftLengthChooser
from ar2dlm.engine.output import GenerationResult, default_stop_ids, encode_prompt
from ar2dlm.engine.params import AUTO, DecodeParams
from ar2dlm.engine.request import Request, RequestOutput
from ar2dlm.engine.runner import ModelRunner
from ar2dlm.engine.scheduler import Scheduler, SchedulerLimits
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.open import context_length

log = logging.getLogger(__name__)


class TextStream:
    """Iterate to get text deltas; `result` holds the GenerationResult once the iteration is over."""

    def __init__(self, gen: Iterator[str]):
        self._gen = gen
        self.result: GenerationResult | None = None

    def __iter__(self):
        self.result = yield from self._gen


class Engine:
    def __init__(self, dlm: BlockDiffusionLM, tokenizer=None, max_running: int = 16, max_fed_tokens: int = 4096,
                 linear_kernel: str = "auto", fused: bool = True):
        self.runner = ModelRunner(dlm, linear_kernel, fused)
        self._choosers: dict[tuple[bool, bool], DraftLengthChooser] = {}
        self._warned_own_head = False
        self.dlm = self.runner.dlm
        self.tokenizer = tokenizer
        self.context = context_length(dlm)
        self.cache = self.runner.new_cache(max_running)
        self.scheduler = Scheduler(SchedulerLimits(max_running, max_fed_tokens), self.cache)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.forwards = 0  # model calls made (a step with nothing to feed makes none)

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, prompt, params: DecodeParams | None = None, request_id: str | None = None,
                    **overrides) -> str:
        """Queue a prompt (text or token ids); returns its id. It starts at the next step with a free cache row."""
        params = (params or DecodeParams()).replace(**overrides) if overrides else (params or DecodeParams())
        if self.runner.feature_window and params.policy not in ("verify", "ar"):
            raise Ar2dlmError(f"a feature drafter decodes with verify (the parent's exact output, drafted) or ar "
                              f"(the parent alone), not {params.policy}: it is the unchanged parent plus a drafter, "
                              f"not a block-diffusion model")
        ids = self._prompt_ids(prompt)
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise Ar2dlmError(f"request id {request_id!r} is already in use")
        stop_ids = set(params.stop_token_ids) if params.stop_token_ids is not None else \
            set(default_stop_ids(self.tokenizer, self.dlm.hf_config))
        req = Request(request_id, ids, params, self._room(ids, params.max_new_tokens), self.dlm.config, stop_ids,
                      self.tokenizer, self.dlm.device, self._draft_chooser(params), self.runner.feature_window)
        self._check_verifier(params)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def _check_verifier(self, params: DecodeParams) -> None:
        """Say once that `verify` on a fully converted dLM reproduces that model's own AR head, not its parent (only a
        gated drafter's clean positions are the parent; an AR model decoded as a block-size-1 dLM is itself)."""
        config = self.dlm.config
        if params.policy == "verify" and not config.drafter and config.block_size > 1 and not self._warned_own_head:
            self._warned_own_head = True
            log.warning("verify on a fully converted dLM: the output is exactly this model's own AR head (its clean "
                        "stream), not its parent's; a gated drafter (convert --drafter) verifies with the parent")

    def _draft_chooser(self, params: DecodeParams) -> DraftLengthChooser | None:
        """The engine's chooser of draft lengths for `verify` with draft_len auto (one per drafting layout, use of
        prompt lookup and tree drafts, whose acceptance differs; its forward costs are measured on first use)."""
        if params.policy != "verify" or params.draft_len != AUTO:
            return None
        key = (params.draft_every_length, params.lookup_drafts, params.draft_tree)
        if key not in self._choosers:
            feature = bool(self.runner.feature_window)
            self._choosers[key] = DraftLengthChooser(
                max(1, self.dlm.config.block_size - 1), params.draft_every_length,
                lambda shapes, rows: shape_cost(self.dlm, sorted(shapes), context=COST_CONTEXT, repeats=3,
                                                linear_kernel=self.runner.linear_kernel,
                                                fused=self.runner.fused is not None, rows=rows),
                lookup=params.lookup_drafts,
                drafter_cost=(lambda rows: drafter_cost(self.runner, rows, repeats=3)) if feature else None)
        return self._choosers[key]

    def abort(self, request_id: str) -> bool:
        """Cancel a request (waiting or running); its cache row is free for the next step. False if unknown/over."""
        req = self.requests.pop(request_id, None)
        if req is None or req.finished:
            return False
        self.scheduler.retire(req)
        req.finish(len(req.tokens), "cancelled", time.perf_counter())
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def max_running(self) -> int:
        """Requests decoded together at most (cache-pool rows); more wait in the queue."""
        return self.scheduler.limits.max_running

    # ------------------------------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """Admit, run one forward, commit, retire. Returns an output for every request that took part."""
        self.scheduler.admit()
        for chooser in self._choosers.values():  # draft lengths are chosen for the batch that runs
            chooser.rows = len(self.scheduler.running)
        fwd = self.scheduler.schedule()
        if fwd is None:
            return []
        t0 = time.perf_counter()
        for req, _ in fwd.members:
            if req.t_start is None:
                req.t_start = t0
        features = [None] * len(fwd.rows) if self.runner.feature_window else None
        logits = self.runner.forward(self.cache, fwd.row_start, [(r.state, p) for r, p in fwd.rows], features)
        self.forwards += any(p is not None and p.fed for _, p in fwd.rows)
        now = time.perf_counter()
        committed = []
        for i, ((req, plan), row_logits) in enumerate(zip(fwd.rows, logits)):
            if plan is None:
                continue
            extra = {"features": features[i]} if features is not None and req.params.policy == "verify" else {}
            old, new = req.state.apply(plan, row_logits, req.policy, req.sampling, req.generator, **extra)
            req.after_forward(old, new, now)
            committed.append(req)
        if features is not None:
            self._feature_drafts(committed)
        outputs = [req.output() for req in committed]
        for req, _ in fwd.members:
            if req.finished:
                self.scheduler.retire(req)
                self.requests.pop(req.request_id, None)
        return outputs

    def _feature_drafts(self, requests: list[Request]) -> None:
        """A feature drafter's drafts for every running verify sequence that wants them, in one drafter call."""
        drafting = [r for r in requests if not r.finished and getattr(r.state, "wants_drafts", False)]
        if not drafting:
            return
        logits = self.runner.draft([r.state.context for r in drafting], [r.state.toks[-1] for r in drafting],
                                   self.dlm.config.block_size - 1)
        for req, row in zip(drafting, logits):
            req.state.set_drafts(row, req.policy, req.sampling, req.generator)

    # ------------------------------------------------------------------------------------------ loops
    def generate(self, prompt, params: DecodeParams | None = None, **overrides) -> GenerationResult:
        return self.generate_batch([prompt], params, **overrides)[0]

    def generate_batch(self, prompts: Sequence, params: DecodeParams | None = None,
                       **overrides) -> list[GenerationResult]:
        """Decode prompts together (at most `max_running` at a time, the rest join as rows free up)."""
        if not prompts:
            raise Ar2dlmError("no prompts")
        ids = [self.add_request(p, params, **overrides) for p in prompts]
        results: dict[str, GenerationResult] = {}
        try:
            while len(results) < len(ids):
                for out in self.step():
                    if out.finished and out.request_id in ids:
                        results[out.request_id] = out.result
        finally:
            for rid in ids:
                if rid not in results:
                    self.abort(rid)
        return [results[rid] for rid in ids]

    def stream(self, prompt, params: DecodeParams | None = None, **overrides) -> TextStream:
        """Text deltas of the decoded prefix (in order) as forwards commit tokens; `.result` at the end."""
        if self.tokenizer is None:
            raise Ar2dlmError("streaming text needs a tokenizer")
        rid = self.add_request(prompt, params, **overrides)
        return TextStream(self._stream(rid))

    def _stream(self, rid: str):
        try:
            while True:
                for out in self.step():
                    if out.request_id != rid:
                        continue
                    if out.delta:
                        yield out.delta
                    if out.finished:
                        return out.result
        finally:
            self.abort(rid)  # a consumer that stops early frees the row (no-op once finished)

    # ------------------------------------------------------------------------------------------ checks
    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise Ar2dlmError("a text prompt needs a tokenizer (or pass token ids)")
            return encode_prompt(self.tokenizer, prompt)
        if isinstance(prompt, torch.Tensor):
            return prompt.reshape(-1).tolist()
        return [int(t) for t in prompt]

    def _room(self, ids: list[int], max_new: int) -> int:
        """The number of tokens to generate: max_new, cut to what the context window leaves."""
        if not ids:
            raise Ar2dlmError("empty prompt")
        if self.context is not None:
            if len(ids) >= self.context:
                raise Ar2dlmError(f"the prompt has {len(ids)} tokens; the model's context window is "
                                  f"{self.context} (max_position_embeddings)")
            max_new = min(max_new, self.context - len(ids))
        return max_new
