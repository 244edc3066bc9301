"""What `ar2dlm convert --drafter` does differently from a dLM conversion: the model, the masks, the held-out set
and the summary. The loop itself (accumulation, time budget, checkpoints, resume, metrics) is the shared trainer's.
"""

from __future__ import annotations

import torch

from ar2dlm.drafter.gated import GatedDrafterLM
from ar2dlm.drafter.gated_eval import REPORTED_OFFSETS, DraftProbe, build_probes
from ar2dlm.drafter.gated_objective import drafter_scored, full_blocks
from ar2dlm.errors import Ar2dlmError
from ar2dlm.masking import MaskingConfig, noise_batch
from ar2dlm.model.loading import resolve_model_source
from ar2dlm.training.loss import scorable
from ar2dlm.training.trainer import MaskedBatch


def prepare_drafter(cfg, device: torch.device, backbone, tokenizer) -> GatedDrafterLM:
    """A gated drafter on the (frozen) parent `backbone`, fresh or from `--init-drafter`, ready to train on
    `device`."""
    dlm = GatedDrafterLM.from_base(backbone, tokenizer, cfg.block_size, cfg.token_shift, cfg.mask_token,
                                   base_model=resolve_model_source(cfg.model), rank=cfg.lora_rank,
                                   alpha=cfg.lora_alpha)
    if cfg.init_drafter:
        init_from_drafter(dlm, cfg)
    if cfg.gradient_checkpointing:
        dlm.enable_gradient_checkpointing()
    dlm.to(device)
    if device.type == "cuda":
        dlm.set_attention_backend("flex")
    dlm.train()
    return dlm


def init_from_drafter(dlm: GatedDrafterLM, cfg) -> None:
    """Copy the weights of the saved drafter `cfg.init_drafter` into `dlm`, after checking that it was made for the
    same parent with the same adapter shape and block layout."""
    from ar2dlm.drafter.gated import copy_adapter_weights, is_drafter_folder, read_drafter_config
    from ar2dlm.model.loading import resolve_dlm_path

    path = resolve_dlm_path(cfg.init_drafter)
    if not is_drafter_folder(path):
        raise Ar2dlmError(f"--init-drafter {cfg.init_drafter}: not a drafter folder or shipped drafter name")
    meta = read_drafter_config(path)
    lora, dlm_meta = meta["drafter"], meta["dlm"]
    wanted = {"parent": (resolve_model_source(meta["base_model"]), dlm.config.base_model),
              "--lora-rank": (lora["rank"], cfg.lora_rank), "--lora-alpha": (lora["alpha"], cfg.lora_alpha),
              "--block-size": (dlm_meta["block_size"], cfg.block_size),
              "mask token id": (dlm_meta["mask_token_id"], dlm.config.mask_token_id),
              "adapted layers": (sorted(lora["targets"]), sorted(dlm.lora_settings["targets"]))}
    for what, (saved, here) in wanted.items():
        if saved != here:
            raise Ar2dlmError(f"--init-drafter {cfg.init_drafter} has {what} {saved}, this run {here}")
    copy_adapter_weights(dlm, path)


def full_block_micro(batch, cfg, mask_id: int) -> MaskedBatch:
    """Every maskable token masked: each block is a clean prefix and a block of mask tokens, the drafting task."""
    maskable = scorable(batch.maskable, token_shift=True)
    return MaskedBatch(full_blocks(maskable, batch.input_ids, mask_id), batch.input_ids,
                       drafter_scored(maskable, cfg.block_size), batch.lengths)


def drafter_micro(batch, cfg, mask_id: int, masking: MaskingConfig, generator: torch.Generator) -> MaskedBatch:
    """A padded batch as a drafter micro-batch: fully masked blocks (default) or the --masking schedule, scored
    only where a mask position makes the prediction."""
    if cfg.drafter_masking == "full":
        return full_block_micro(batch, cfg, mask_id)
    nb = noise_batch(batch.input_ids, scorable(batch.maskable, token_shift=True), cfg.block_size, mask_id, masking,
                     generator=generator)
    lengths = batch.lengths.repeat(nb.noisy_ids.shape[0] // batch.input_ids.shape[0])  # 2x with complementary
    return MaskedBatch(nb.noisy_ids, nb.clean_ids, drafter_scored(nb.masked, cfg.block_size), lengths)


def drafter_heldout(dlm: GatedDrafterLM, batches, cfg, device) -> tuple[list[MaskedBatch], list[DraftProbe]]:
    """Held-out micro-batches (fully masked blocks whatever the training masks: the drafting task itself, no
    randomness) and the draft acceptance probes (the parent's greedy continuations, computed once: the parent
    never changes)."""
    batches = list(batches)
    micro = [full_block_micro(b, cfg, dlm.config.mask_token_id).to(device) for b in batches]
    return micro, build_probes(dlm, batches, cfg.block_size)


def drafter_summary(cfg, before: dict, after: dict) -> dict:
    """The drafter's headline numbers for summary.json: draft accuracy at +1.. and tokens per verify step."""

    def row(stats: dict) -> dict:
        accs = [stats[f"heldout_draft_acc_{k}"] for k in range(1, REPORTED_OFFSETS + 1)
                if f"heldout_draft_acc_{k}" in stats]
        accepted = stats.get("heldout_draft_accepted")
        return {"draft_acc": accs, "tokens_per_verify_step": None if accepted is None else 1.0 + accepted}

    return {"target": cfg.drafter_target, "masking": cfg.drafter_masking, "lora_rank": cfg.lora_rank,
            "anchors": after.get("heldout_draft_anchors", 0), "before": row(before), "after": row(after)}
