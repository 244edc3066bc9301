"""A request: one sequence from admission to its result. It owns its sequence state (`BlockState` for the block
diffusion policies, `VerifyState` for draft-and-verify), its sampling generator, its stop
state and its timing; the scheduler moves it from waiting to running to finished."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from ar2dlm.engine.blocks import BlockState
from ar2dlm.engine.output import Detokenizer, GenerationResult
from ar2dlm.engine.params import DecodeParams
from ar2dlm.engine.verify import VerifyPolicy, VerifyState


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one step did for one request: its new stream text, whether it is over, and its result once it is."""

    request_id: str
    delta: str
    new_tokens: list[int]
    finished: bool
    result: GenerationResult | None = None


class Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: DecodeParams, max_new_tokens: int,
                 model_config, stop_ids: set[int], tokenizer, device, draft_chooser=None, feature_window: int = 0):
        self.request_id = request_id
        self.params = params
        self.policy, self.sampling = params.make_policy(), params.sampling()
        if params.policy == "verify":
            fixed = isinstance(params.draft_len, int)
            draft_len = params.draft_len if fixed else max(1, model_config.block_size - 1)
            self.state = VerifyState(prompt_ids, max_new_tokens, draft_len, model_config.mask_token_id,
                                     model_config.token_shift, params.draft_every_length, draft_chooser,
                                     params.lookup_drafts, feature_window, params.draft_tree)
        elif params.policy == "ar" and feature_window:
            # a feature drafter's `ar` is its unchanged parent alone: verify with no drafts (one causal forward per
            # token, no mask block: the parent never sees a mask token)
            self.policy = VerifyPolicy()
            self.state = VerifyState(prompt_ids, max_new_tokens, 0, model_config.mask_token_id,
                                     model_config.token_shift)
        else:
            self.state = BlockState(prompt_ids, max_new_tokens, model_config.block_size, model_config.mask_token_id,
                                    model_config.token_shift, params, self.policy.leftmost_only)
        self.generator = None
        if not self.sampling.greedy:  # its own generator: the same tokens alone or in any batch
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.stop_ids = stop_ids
        self.detok = Detokenizer(tokenizer, params.stop_strings)
        self.status = Status.WAITING
        self.row: int | None = None  # its cache-pool row while running
        self.n_tokens: int | None = None  # kept tokens once finished
        self.stop_reason: str | None = None
        self.t_arrival = time.perf_counter()
        self.t_start: float | None = None  # its first forward
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.sent = 0  # tokens already reported in a RequestOutput

    @property
    def prompt_len(self) -> int:
        return self.state.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def tokens(self) -> list[int]:
        """Generated tokens: the kept ones once finished, the decoded prefix before."""
        b = self.state
        n = self.n_tokens if self.n_tokens is not None else b.decoded - b.prompt_len
        return b.toks[b.prompt_len:b.prompt_len + n]

    # -------------------------------------------------------------------------------------------- progress
    def after_forward(self, old: int, new: int, now: float) -> None:
        """The decoded prefix grew from `old` to `new` (absolute positions): look for stops in what became final."""
        if new > old and self.t_first is None:
            self.t_first = now
        b = self.state
        p0 = b.prompt_len
        eos_at = next((p + 1 for p in range(old, new) if b.toks[p] in self.stop_ids), None)
        hi = eos_at or new
        n = self.detok.first_stop_string_end(b.toks[p0:hi], old - p0, hi - p0)
        if n is not None:
            self.finish(n, "stop_string", now)
        elif eos_at is not None:
            self.finish(eos_at - p0, "eos", now)
        elif new == b.limit:
            self.finish(b.limit - p0, "length", now)

    def finish(self, n_tokens: int, reason: str, now: float) -> None:
        self.status, self.n_tokens, self.stop_reason, self.t_end = Status.FINISHED, n_tokens, reason, now
        self.state.release()

    def output(self) -> RequestOutput:
        """The stream delta and new tokens since the last output; the result when finished."""
        tokens = self.tokens
        new_tokens, self.sent = tokens[self.sent:], len(tokens)
        delta = self.detok.delta(tokens, final=self.finished) if self.detok.tokenizer is not None else ""
        return RequestOutput(self.request_id, delta, new_tokens, self.finished,
                             self.result() if self.finished else None)

    def result(self) -> GenerationResult:
        start = self.t_start if self.t_start is not None else self.t_arrival
        end = self.t_end if self.t_end is not None else time.perf_counter()
        ttft = None if self.t_first is None else self.t_first - start
        return GenerationResult(self.tokens, self.detok.final_text(self.tokens), self.state.nfe, end - start, ttft,
                                self.stop_reason or "running", self.prompt_len, start - self.t_arrival)
