"""What the training jobs (`convert`, `distill`) share around the trainer: the model made ready to train, and the end
of a run (the final model saved, the loss plot drawn, the summary built, written and shown, the resume checkpoint
dropped).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.loading import resolve_model_source
from ar2dlm.training import checkpoint
from ar2dlm.training.metrics import plot_loss
from ar2dlm.training.summary import SUMMARY_FILE, summary_lines
from ar2dlm.training.trainer import Trainer, gather
from ar2dlm.utils.files import write_json


def prepare_dlm(cfg, device, backbone, tokenizer, dlm: BlockDiffusionLM | None = None) -> BlockDiffusionLM:
    """The model to train: a fresh dLM on `backbone` (or the given one), LoRA / checkpointing / backend applied."""
    if dlm is None:
        dlm = BlockDiffusionLM.from_base(backbone, tokenizer, cfg.block_size, cfg.token_shift, cfg.mask_token,
                                         base_model=resolve_model_source(cfg.model))
    if cfg.lora_rank and not dlm.is_lora:
        dlm.apply_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        dlm.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dlm.to(device)
    if device.type == "cuda":
        dlm.set_attention_backend("flex")
    dlm.train()
    return dlm


def finish_run(cfg, trainer: Trainer, after: dict, final, tokenizer, title: str) -> dict:
    """Save the final model and loss plot (main rank) and build the run summary (every rank)."""
    state, info, out = trainer.state, trainer.info, Path(cfg.output)
    # equal on every rank when DDP kept them in sync (FSDP ranks hold different shards: nothing to compare)
    checksums = None if cfg.fsdp else gather(param_checksum(trainer.objective), info)
    summary = {
        "model": cfg.model, "output": str(out / "model"), "steps": state["step"], "tokens": state["tokens"],
        "train_seconds": round(state["train_seconds"], 1), "stopped_early": state.get("stopped_early", False),
        "heldout_before": state["before"], "heldout_after": after,
        "dlm": asdict(final.config) if final is not None else None,
        "lora_rank": cfg.lora_rank, "world_size": info.world_size, "rank_param_checksums": checksums,
    }
    if info.is_main:
        final.save_pretrained(out / "model", tokenizer)
        plot_loss(out / "metrics.jsonl", out / "loss.png", title=title)
    return summary


def complete_run(cfg, summary: dict, info) -> None:
    """The main rank's last act: write summary.json, then drop the resume checkpoint (weights plus optimizer state,
    about 3x the model: 1.6 GB beside a 517 MB SmolLM2 dLM) unless --keep-checkpoint. In that order, a crash
    between the two leaves a finished run with a stale checkpoint, never an unfinished run without one."""
    if not info.is_main:
        return
    out = Path(cfg.output)
    write_json(out / SUMMARY_FILE, summary)
    if not cfg.keep_checkpoint:
        checkpoint.remove(out / "checkpoint")


def print_summary(summary: dict) -> None:
    """The run's result in plain lines (summary.json keeps every number)."""
    print("\n".join(summary_lines(summary)))


@torch.no_grad()
def param_checksum(module) -> float:
    """A cheap fingerprint of the trainable weights (sum of |w| * position-dependent factor)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(q for q in module.parameters() if q.requires_grad):
        local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 shards: the rank's own piece
        total += local.detach().double().abs().sum().cpu() * (1 + (i % 7) / 10)
    return float(total)
