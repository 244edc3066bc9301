"""Training throughput: a dLM conversion step vs a plain AR fine-tuning step of the same model, batch and length.

Both steps are timed in alternation in one process (AR, dLM, AR, dLM, ...) so that machine noise hits both alike,
and the ratio is printed with the raw numbers. The dLM step runs the 2L [noisy | clean] layout, so about twice the
tokens pass through the network; the target is a ratio of at most 2.5.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ar2dlm.errors import Ar2dlmError
from ar2dlm.masking import MaskingConfig, noise_batch
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.loading import load_base
from ar2dlm.training.loss import DiffusionObjective, scorable
from ar2dlm.training.optim import build_optimizer
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
from ar2dlm.utils.devices import resolve_device
from ar2dlm.utils.files import check_output_file, write_json

# Dense bf16 peak FLOP/s of known accelerators, for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@dataclass
class TrainBenchConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "base model (embedded name, folder, gguf, hub id)"})
    batch_size: int = field(default=4, metadata={"help": "sequences per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    block_size: int = field(default=4, metadata={"help": "dLM block size"})
    steps: int = field(default=6, metadata={"help": "timed steps per method"})
    warmup: int = field(default=2, metadata={"help": "untimed steps per method first"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto", "choices": ["auto", "cpu", "cuda"]})
    json_out: str | None = field(default=None, metadata={"help": "also write the results here"})

    def __post_init__(self):
        if self.batch_size < 1 or self.seq_len < 2 * self.block_size or self.steps < 1 or self.warmup < 0:
            raise Ar2dlmError("need batch-size >= 1, seq-len >= 2 * block-size, steps >= 1, warmup >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise Ar2dlmError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        check_output_file(self.json_out, "--json-out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, TrainBenchConfig)


def config_from_args(args: argparse.Namespace) -> TrainBenchConfig:
    return dataclass_from_args(TrainBenchConfig, args)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _step_functions(cfg: TrainBenchConfig, device: torch.device):
    """(AR step, dLM step, parameter count): one optimizer step each, on the same random batch and model."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    base, tokenizer = load_base(cfg.model, dtype=torch.float32)
    ar_model = copy.deepcopy(base).to(device).train()
    dlm = BlockDiffusionLM.from_base(base, tokenizer, block_size=cfg.block_size).to(device).train()
    if device.type == "cuda":
        dlm.set_attention_backend("flex")
    if cfg.gradient_checkpointing:
        for m in (ar_model, dlm.backbone):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    objective = DiffusionObjective(dlm)
    ar_opt = build_optimizer(ar_model, 1e-6, 0.0)
    dlm_opt = build_optimizer(objective, 1e-6, 0.0)

    gen = torch.Generator().manual_seed(0)
    vocab = len(tokenizer) - 1  # real tokens only (the dLM added the mask row)
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=gen)
    maskable = scorable(torch.ones_like(ids, dtype=torch.bool), True)
    masking = MaskingConfig(strategy="position")
    ids_dev = ids.to(device)

    def ar_step():
        with autocast:
            logits = ar_model(ids_dev).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids_dev[:, 1:].flatten())
        loss.backward()
        ar_opt.step()
        ar_opt.zero_grad(set_to_none=True)

    def dlm_step():
        nb = noise_batch(ids, maskable, cfg.block_size, dlm.config.mask_token_id, masking, generator=gen)
        with autocast:
            ce, _ = objective(nb.noisy_ids.to(device), nb.clean_ids.to(device), nb.masked.to(device))
            loss = ce / nb.masked.sum().clamp(min=1).to(device)
        loss.backward()
        dlm_opt.step()
        dlm_opt.zero_grad(set_to_none=True)

    return ar_step, dlm_step, _param_count(ar_model)


def _time_steps(steps: dict, warmup: int, timed: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each timed step, the methods alternating so that machine noise hits them alike."""
    times = {name: [] for name in steps}
    for i in range(warmup + timed):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def _add_utilisation(result: dict, device: torch.device, n_params: int, tokens: int) -> None:
    """Model TFLOP/s (6 N per token and pass) and, on a known GPU, the share of its bf16 peak."""
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    result["gpu"] = name
    for key, passes in (("ar", 1), ("dlm", 2)):  # the dLM runs 2L positions per sequence
        flops = 6 * n_params * tokens * passes / result[key]["step_s"]
        result[key]["model_tflops"] = flops / 1e12
        if peak:
            result[key]["mfu"] = flops / peak


def _print_result(cfg: TrainBenchConfig, result: dict) -> None:
    print(f"model {cfg.model} ({result['params'] / 1e6:.0f}M params) on {result['device']}, batch {cfg.batch_size} "
          f"x {cfg.seq_len} tokens, block {cfg.block_size}, median of {cfg.steps} steps")
    print(f"{'':<22}{'step (s)':>10}{'tokens/s':>12}")
    for key, label in (("ar", "AR fine-tuning"), ("dlm", "dLM conversion")):
        extra = f"  MFU {result[key]['mfu']:.1%}" if "mfu" in result[key] else ""
        print(f"{label:<22}{result[key]['step_s']:>10.3f}{result[key]['tokens_per_s']:>12.0f}{extra}")
    verdict = "meets" if result["dlm_over_ar_step_time"] <= 2.5 else "misses"
    print(f"dLM step / AR step = {result['dlm_over_ar_step_time']:.2f}x ({verdict} the <= 2.5x target)")


def run(cfg: TrainBenchConfig) -> dict:
    device = resolve_device(cfg.device)  # cuda without a GPU is an error line, not torch's assertion
    ar_step, dlm_step, n_params = _step_functions(cfg, device)
    times = _time_steps({"ar": ar_step, "dlm": dlm_step}, cfg.warmup, cfg.steps, device)
    tokens = cfg.batch_size * cfg.seq_len
    result = {"config": asdict(cfg), "device": str(device), "params": n_params}
    for name in ("ar", "dlm"):
        med = statistics.median(times[name])
        result[name] = {"step_s": med, "tokens_per_s": tokens / med, "steps": times[name]}
    result["dlm_over_ar_step_time"] = result["dlm"]["step_s"] / result["ar"]["step_s"]
    if device.type == "cuda":
        _add_utilisation(result, device, n_params, tokens)
    _print_result(cfg, result)
    if cfg.json_out:
        write_json(cfg.json_out, result)
    return result
