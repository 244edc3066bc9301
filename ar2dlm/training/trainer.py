"""The optimisation loop shared by `convert` and `distill`: accumulation, a per-token mean over the global batch,
LR schedule (following the time budget with --max-minutes), logging, held-out checks, atomic checkpoints and exact
resume, under DDP or FSDP.

What differs between the two jobs comes in as three things:
  * an objective module returning sums: `(loss_sum, correct, *extra_sums)`; the trainer backpropagates
    `loss_sum / scored tokens of the global batch` and logs every sum divided by that count under
    `objective.stat_names` (default: loss, masked_acc);
  * `next_micro(fraction)`: the next micro-batch (with `.to(device)`, `.args()` for the objective, `.n_scored`,
    `.n_tokens`), given how far through training we are (for curricula);
  * the data position (`data_state()` / `load_data_state()`), saved per rank in every checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ar2dlm.errors import Ar2dlmError
from ar2dlm.training import checkpoint, distributed
from ar2dlm.training.metrics import MetricsLog
from ar2dlm.training.optim import lr_factor, progress, set_lr
from ar2dlm.training.summary import SUMMARY_FILE
from ar2dlm.utils.files import check_output_dir

log = logging.getLogger(__name__)

DEFAULT_STATS = ("loss", "masked_acc")


class MaskedBatch:
    """A micro-batch in the [noisy | clean] layout, as the trainer consumes it (convert and distill build these).

    `block_size` is the attention block size it was masked for; None means the model's configured one."""

    __slots__ = ("noisy_ids", "clean_ids", "masked", "lengths", "block_size")

    def __init__(self, noisy_ids, clean_ids, masked, lengths, block_size: int | None = None):
        self.noisy_ids, self.clean_ids, self.masked, self.lengths = noisy_ids, clean_ids, masked, lengths
        self.block_size = block_size

    def to(self, device):
        tensors = (self.noisy_ids, self.clean_ids, self.masked, self.lengths)
        return MaskedBatch(*(t.to(device) for t in tensors), block_size=self.block_size)

    def args(self) -> tuple:
        return self.noisy_ids, self.clean_ids, self.masked, self.lengths, self.block_size

    @property
    def n_scored(self) -> int:
        return int(self.masked.sum())

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def gather(obj, info) -> list:
    """Every rank's `obj`, in rank order (data positions and RNG states differ per rank)."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    box = [None] * info.world_size
    dist.all_gather_object(box, obj)
    return box


def check_run_folder(cfg) -> None:
    """Refuse to overwrite a run, or to resume one that is not there (before any expensive work). A finished run
    has dropped its checkpoint (unless --keep-checkpoint), so its summary is what marks it."""
    out = Path(cfg.output)
    check_output_dir(out, "--output")
    has_checkpoint, finished = checkpoint.exists(out / "checkpoint"), (out / SUMMARY_FILE).is_file()
    if cfg.resume and not has_checkpoint:
        if finished:
            raise Ar2dlmError(f"{out} holds a finished run whose checkpoint was dropped (--keep-checkpoint keeps "
                              f"it): nothing to resume; choose another --output")
        raise Ar2dlmError(f"--resume given but there is no checkpoint in {out / 'checkpoint'}")
    if not cfg.resume and has_checkpoint:
        raise Ar2dlmError(f"{out} already holds a run: pass --resume to continue it, or choose another --output")
    if not cfg.resume and finished:
        raise Ar2dlmError(f"{out} already holds a finished run: remove it to run again, or choose another --output")


def autocast_for(device: torch.device):
    """bf16 autocast on GPU, nothing on CPU (bf16 matmuls are slow there)."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def heldout_stats(model, batches, autocast, names=DEFAULT_STATS) -> dict:
    """The objective's sums over fixed held-out micro-batches, per scored token, as `heldout_<name>` (acc for
    masked_acc). `model` may be DDP/FSDP-wrapped: calling the wrapper lets FSDP gather weights."""
    was_training = model.training
    model.eval()
    totals, count = None, 0
    for b in batches:
        with autocast():
            out = model(*b.args())
        sums = torch.stack([torch.as_tensor(o, dtype=torch.float64).detach().cpu() for o in out])
        totals = sums if totals is None else totals + sums
        count += int(b.n_scored)
    model.train(was_training)
    keys = ["heldout_" + ("acc" if n == "masked_acc" else n) for n in names]
    if count == 0 or totals is None:
        return {**{k: float("nan") for k in keys}, "heldout_tokens": 0}
    return {**{k: float(v) / count for k, v in zip(keys, totals)}, "heldout_tokens": count}


class Trainer:
    def __init__(self, cfg, *, info, device, objective, model, optimizer, out: Path, desc: str, heldout=()):
        self.cfg, self.info, self.device = cfg, info, device
        self.objective, self.model, self.optimizer = objective, model, optimizer
        self.out, self.ckpt_dir, self.desc = Path(out), Path(out) / "checkpoint", desc
        self.heldout = list(heldout)
        self.names = tuple(getattr(objective, "stat_names", DEFAULT_STATS))
        self.autocast = autocast_for(device)
        self.state = {"step": 0, "tokens": 0, "train_seconds": 0.0, "before": None, "stopped_early": False}
        self.metrics: MetricsLog | None = None

    def evaluate(self) -> dict:
        return heldout_stats(self.model, self.heldout, self.autocast, self.names) if self.heldout else {}

    # ------------------------------------------------------------------------------------------ the loop
    def run(self, next_micro: Callable[[float], object], data_state: Callable[[], object],
            load_data_state: Callable[[object], None]) -> dict:
        """Train until `max_steps` or the time budget; returns the held-out evaluation after training."""
        cfg, info = self.cfg, self.info
        state = self._start(load_data_state)
        bar = tqdm(total=cfg.max_steps, initial=state["step"], desc=self.desc, disable=not info.is_main,
                   dynamic_ncols=True)
        t_start = time.perf_counter() - state["train_seconds"]
        budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
        while state["step"] < cfg.max_steps:
            t0 = time.perf_counter()
            fraction = min(1.0, max(state["step"] / cfg.max_steps,
                                    state["train_seconds"] / budget_s if budget_s else 0.0))
            micro = [next_micro(fraction).to(self.device) for _ in range(cfg.grad_accum)]
            per_token, grad_norm, step_tokens = self._step(micro)
            lr = self._apply_lr_and_update(state, t_start, budget_s)
            state["step"] += 1
            state["tokens"] += step_tokens
            dt = time.perf_counter() - t0
            state["train_seconds"] = time.perf_counter() - t_start
            if info.is_main and (state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps):
                extra = {"block_size": micro[0].block_size} if micro[0].block_size else {}
                self.metrics.write({"step": state["step"], **per_token, "lr": lr, "grad_norm": float(grad_norm),
                                    "fraction": round(fraction, 4), "tokens": state["tokens"], **extra,
                                    "tokens_per_s": step_tokens / dt, "elapsed_s": round(state["train_seconds"], 2)})
            bar.set_postfix(loss=f"{per_token['loss']:.3f}", acc=f"{per_token.get('masked_acc', 0):.2f}",
                            tok_s=f"{step_tokens / dt:.0f}")
            bar.update(1)
            if self._after_step(state, budget_s, data_state):
                break
        bar.close()
        after = self.evaluate()
        if info.is_main:
            self.metrics.write({"step": state["step"], **after})
        return after

    def _start(self, load_data_state: Callable[[object], None]) -> dict:
        """Resume from the checkpoint when asked; open the metrics log; evaluate the model before training once."""
        cfg, info = self.cfg, self.info
        if cfg.resume:
            self.state = checkpoint.load(self.ckpt_dir, module=self.objective, optimizer=self.optimizer,
                                         fsdp=cfg.fsdp)
            load_data_state(self.state["data"][info.rank])
        state = self.state
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=state["step"] if cfg.resume else None)
        if state["before"] is None:
            state["before"] = self.evaluate()
            if info.is_main:
                self.metrics.write({"step": 0, **state["before"]})
        return state

    def _step(self, micro: list) -> tuple[dict, torch.Tensor, int]:
        """Forward and backward over the micro-batches; returns the per-token sums, the gradient norm and the
        step's tokens, all summed over ranks."""
        cfg, info = self.cfg, self.info
        n_scored = distributed.all_reduce_sum(
            torch.tensor(float(sum(int(m.n_scored) for m in micro)), device=self.device)).item()
        sums = torch.zeros(len(self.names), dtype=torch.float64)
        for i, mb in enumerate(micro):
            sync = contextlib.nullcontext() if (i == len(micro) - 1 or not hasattr(self.model, "no_sync")) \
                else self.model.no_sync()
            with sync, self.autocast():
                out = self.model(*mb.args())
                # DDP averages gradients over ranks; scaling by world/n_scored makes it a global per-token mean.
                (out[0] * info.world_size / max(n_scored, 1.0)).backward()
            sums += torch.tensor([float(o.detach()) for o in out], dtype=torch.float64)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.grad_clip or float("inf"))
        stats = distributed.all_reduce_sum(sums.to(self.device)).cpu()
        step_tokens = int(distributed.all_reduce_sum(
            torch.tensor(float(sum(int(m.n_tokens) for m in micro)), device=self.device)).item())
        per_token = {n: float(v) / max(n_scored, 1.0) for n, v in zip(self.names, stats)}
        return per_token, grad_norm, step_tokens

    def _apply_lr_and_update(self, state: dict, t_start: float, budget_s: float | None) -> float:
        """Set this step's learning rate (warm-up, then decay by steps or by the time budget) and step."""
        cfg = self.cfg
        decay = progress(state["step"], cfg.warmup_steps, cfg.max_steps, time.perf_counter() - t_start, budget_s)
        lr = cfg.lr * lr_factor(state["step"], cfg.warmup_steps, decay, cfg.min_lr_ratio)
        if self.info.enabled:  # wall-clock progress differs by a hair between ranks: all use the main rank's LR
            lr = distributed.broadcast_object(lr, self.info)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _after_step(self, state: dict, budget_s: float | None, data_state: Callable[[], object]) -> bool:
        """Evaluate and checkpoint when due; True when the time budget is spent."""
        cfg, info = self.cfg, self.info
        if cfg.eval_every and state["step"] % cfg.eval_every == 0 and self.heldout:
            ev = self.evaluate()
            if info.is_main:
                self.metrics.write({"step": state["step"], **ev})
        out_of_time = budget_s is not None and state["train_seconds"] >= budget_s
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.max_steps or out_of_time:
            trainer_state = {**state, "data": gather(data_state(), info)}
            checkpoint.save(self.ckpt_dir, module=self.objective, optimizer=self.optimizer,
                            trainer_state=trainer_state, fsdp=cfg.fsdp, is_main=info.is_main)
        if os.environ.get("AR2DLM_FAULT_AT_STEP") == str(state["step"]):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: the resume tests kill a run exactly here
        if out_of_time and state["step"] < cfg.max_steps:
            state["stopped_early"] = True
            log.warning("time budget of %.1f min reached at step %d", cfg.max_minutes, state["step"])
            return True
        return False
