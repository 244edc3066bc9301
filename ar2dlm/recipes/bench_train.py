"""Training throughput: conversion steps vs a plain AR fine-tuning step of the same model, batch and length.

The steps are timed in alternation in one process (AR, dLM, LoRA, drafter, AR, ...) so that machine noise hits all
alike, and the ratios to the AR step are printed with the raw numbers. The full and LoRA dLM steps run the 2L
[noisy | clean] layout with gradients, so about twice the tokens pass through the network (target: a full dLM step
at most 2.5x an AR step). The gated drafter's step runs the clean half once without gradients and back-propagates
through the noisy half only (drafter/gated_objective.py), with every block fully masked, as `convert --drafter`.
The feature drafter's step (`convert --drafter-kind feature`) reads the parent's features, computed once per corpus
(timed apart, as "parent features"), and takes every position as an anchor with a block of drafts after it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ar2dlm.drafter.gated import GatedDrafterLM
from ar2dlm.drafter.gated_objective import DrafterObjective, drafter_scored, full_blocks
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
METHODS = {"ar": "AR fine-tuning", "dlm": "dLM conversion", "lora": "dLM LoRA conversion",
           "drafter": "gated drafter", "feature": "feature drafter", "features": "parent features"}


@dataclass
class TrainBenchConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "base model (embedded name, folder, gguf, hub id)"})
    batch_size: int = field(default=4, metadata={"help": "sequences per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    block_size: int = field(default=4, metadata={"help": "dLM block size"})
    steps: int = field(default=6, metadata={"help": "timed steps per method"})
    warmup: int = field(default=2, metadata={"help": "untimed steps per method first"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    methods: str = field(default="ar,dlm,lora,drafter", metadata={
        "help": "steps to time, comma-separated: ar (AR fine-tuning), dlm (full dLM conversion), lora (LoRA dLM "
                "conversion), drafter (gated drafter, convert --drafter), feature (feature drafter, convert --drafter-kind "
                "feature, on cached parent features; also times computing those once)"})
    draft_vocab: int = field(default=8192, metadata={"help": "draft vocabulary of the feature drafter step"})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank of the lora and drafter steps"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto", "choices": ["auto", "cpu", "cuda"]})
    json_out: str | None = field(default=None, metadata={"help": "also write the results here"})

    def __post_init__(self):
        if self.batch_size < 1 or self.seq_len < 2 * self.block_size or self.steps < 1 or self.warmup < 0:
            raise Ar2dlmError("need batch-size >= 1, seq-len >= 2 * block-size, steps >= 1, warmup >= 0")
        unknown = [m for m in self.method_list if m not in METHODS or m == "features"]  # features: with feature
        if unknown or not self.method_list:
            raise Ar2dlmError(f"--methods takes a comma-separated list of {', '.join(METHODS)}; got {self.methods!r}")
        if self.lora_rank < 1:
            raise Ar2dlmError("--lora-rank must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise Ar2dlmError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        check_output_file(self.json_out, "--json-out")

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, TrainBenchConfig)


def config_from_args(args: argparse.Namespace) -> TrainBenchConfig:
    return dataclass_from_args(TrainBenchConfig, args)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _optimizer_step(loss_fn, optimizer):
    """One optimizer step on `loss_fn()`'s loss: the unit every method is timed by."""

    def step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _ar_step(model, ids, autocast):
    def loss():
        with autocast:
            logits = model(ids).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    return _optimizer_step(loss, build_optimizer(model, 1e-6, 0.0))


def _dlm_step(cfg, dlm, ids, autocast, device):
    """A dLM conversion step (full or LoRA, as `dlm` was built) with position-dependent masking."""
    objective, gen = DiffusionObjective(dlm), torch.Generator().manual_seed(0)
    maskable = scorable(torch.ones_like(ids, dtype=torch.bool), True).cpu()

    def loss():
        nb = noise_batch(ids.cpu(), maskable, cfg.block_size, dlm.config.mask_token_id,
                         MaskingConfig(strategy="position"), generator=gen)
        with autocast:
            ce, _ = objective(nb.noisy_ids.to(device), nb.clean_ids.to(device), nb.masked.to(device))
            return ce / nb.masked.sum().clamp(min=1).to(device)

    return _optimizer_step(loss, build_optimizer(objective, 1e-6, 0.0))


def _drafter_step(cfg, drafter, ids, autocast):
    """A gated drafter step as `convert --drafter` takes it: fully masked blocks, the parent's argmax as target."""
    objective = DrafterObjective(drafter, "argmax")
    maskable = scorable(torch.ones_like(ids, dtype=torch.bool), True)
    noisy, scored = full_blocks(maskable, ids, drafter.config.mask_token_id), drafter_scored(maskable, cfg.block_size)

    def loss():
        with autocast:
            ce, _ = objective(noisy, ids, scored)
            return ce / scored.sum().clamp(min=1)

    return _optimizer_step(loss, build_optimizer(objective, 1e-6, 0.0))


def _feature_steps(cfg, backbone, tokenizer, ids) -> dict:
    """A feature drafter step as `convert --drafter-kind feature` takes it (every position an anchor), and the
    one-off computation of the parent's features it reads."""
    from ar2dlm.drafter.feature import FeatureDrafterLM
    from ar2dlm.drafter.feature_training import FeatureObjective, anchor_positions, make_batch

    drafter = FeatureDrafterLM.from_base(backbone, tokenizer, block_size=cfg.block_size,
                                         draft_vocab=min(cfg.draft_vocab, len(tokenizer)))
    drafter.set_draft_vocab(torch.arange(drafter.drafter_cfg.draft_vocab))
    drafter.to(ids.device)
    features = drafter.features_of(ids).half()
    maskable = torch.ones(ids.shape[1], dtype=torch.bool)
    sequences = [(ids[i].cpu(), maskable, features[i].cpu()) for i in range(ids.shape[0])]
    picks = [(i, anchor_positions(maskable)) for i in range(ids.shape[0])]
    objective = FeatureObjective(drafter.train())

    def loss():
        batch = make_batch(sequences, picks, drafter.drafter_cfg.window, cfg.block_size - 1, 0.8).to(ids.device)
        total, _ = objective(*batch.args())
        return total / max(batch.n_scored, 1)

    return {"feature": _optimizer_step(loss, build_optimizer(objective, 1e-6, 0.0)),
            "features": lambda: drafter.features_of(ids)}


def _prepare(model, cfg, device):
    model.to(device).train()
    if device.type == "cuda":
        model.set_attention_backend("flex")
    if cfg.gradient_checkpointing:
        if isinstance(model, GatedDrafterLM):
            model.enable_gradient_checkpointing()
        else:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _step_functions(cfg: TrainBenchConfig, device: torch.device):
    """({method: one optimizer step}, parameter count): every method on its own copy of the model, same batch."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    base, tokenizer = load_base(cfg.model, dtype=torch.float32)
    n_params = _param_count(base)
    vocab = min(len(tokenizer), base.get_input_embeddings().weight.shape[0])  # real tokens (no mask row yet)
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    steps = {}
    for name in cfg.method_list:
        backbone = copy.deepcopy(base)
        if name == "ar":
            ar_model = backbone.to(device).train()
            if cfg.gradient_checkpointing:
                ar_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            steps[name] = _ar_step(ar_model, ids, autocast)
        elif name == "drafter":
            drafter = GatedDrafterLM.from_base(backbone, tokenizer, block_size=cfg.block_size, rank=cfg.lora_rank)
            steps[name] = _drafter_step(cfg, _prepare(drafter, cfg, device), ids, autocast)
        elif name == "feature":
            steps.update(_feature_steps(cfg, backbone, copy.deepcopy(tokenizer), ids))
        else:
            dlm = BlockDiffusionLM.from_base(backbone, tokenizer, block_size=cfg.block_size)
            if name == "lora":
                dlm.apply_lora(rank=cfg.lora_rank)
            steps[name] = _dlm_step(cfg, _prepare(dlm, cfg, device), ids, autocast, device)
    return steps, n_params


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
        if key not in result:
            continue
        flops = 6 * n_params * tokens * passes / result[key]["step_s"]
        result[key]["model_tflops"] = flops / 1e12
        if peak:
            result[key]["mfu"] = flops / peak


def _print_result(cfg: TrainBenchConfig, result: dict) -> None:
    print(f"model {cfg.model} ({result['params'] / 1e6:.0f}M params) on {result['device']}, batch {cfg.batch_size} "
          f"x {cfg.seq_len} tokens, block {cfg.block_size}, median of {cfg.steps} steps")
    print(f"{'':<22}{'step (s)':>10}{'tokens/s':>12}{'x AR step':>11}")
    for key in [k for k in METHODS if k in result]:
        ratio = result["over_ar_step_time"].get(key)
        extra = f"  MFU {result[key]['mfu']:.1%}" if "mfu" in result[key] else ""
        print(f"{METHODS[key]:<22}{result[key]['step_s']:>10.3f}{result[key]['tokens_per_s']:>12.0f}"
              f"{'' if ratio is None else f'{ratio:.2f}x':>11}{extra}")
    if "dlm_over_ar_step_time" in result:
        verdict = "meets" if result["dlm_over_ar_step_time"] <= 2.5 else "misses"
        print(f"dLM step / AR step = {result['dlm_over_ar_step_time']:.2f}x ({verdict} the <= 2.5x target)")


def run(cfg: TrainBenchConfig) -> dict:
    device = resolve_device(cfg.device)  # cuda without a GPU is an error line, not torch's assertion
    steps, n_params = _step_functions(cfg, device)
    times = _time_steps(steps, cfg.warmup, cfg.steps, device)
    tokens = cfg.batch_size * cfg.seq_len
    result = {"config": asdict(cfg), "device": str(device), "params": n_params}
    for name in steps:
        med = statistics.median(times[name])
        result[name] = {"step_s": med, "tokens_per_s": tokens / med, "steps": times[name]}
    result["over_ar_step_time"] = {name: result[name]["step_s"] / result["ar"]["step_s"]
                                   for name in steps if "ar" in steps}
    if "ar" in steps and "dlm" in steps:
        result["dlm_over_ar_step_time"] = result["over_ar_step_time"]["dlm"]
    if device.type == "cuda":
        _add_utilisation(result, device, n_params, tokens)
    _print_result(cfg, result)
    if cfg.json_out:
        write_json(cfg.json_out, result)
    return result
