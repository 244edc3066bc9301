"""`ar2dlm convert`: continuous pretraining that turns a causal LM into a block-diffusion LM (Efficient-DLM recipe).

One path for the data: records -> examples (tokens + which are maskable) -> padded batches -> noised batches
([noisy | clean] layout) -> summed masked-token cross-entropy -> per-token mean over the global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ar2dlm.errors import Ar2dlmError
from ar2dlm.masking import MaskingConfig, noise_batch
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.loading import cache_dir, load_base, resolve_model_source
from ar2dlm.training import checkpoint, distributed
from ar2dlm.training.config import ConvertConfig
from ar2dlm.training.data import Batcher, DataConfig, iter_batches, load_examples, split_heldout
from ar2dlm.training.loss import DiffusionObjective, heldout_metrics, scorable
from ar2dlm.training.metrics import MetricsLog, plot_loss
from ar2dlm.training.optim import build_optimizer, lr_factor, progress, set_lr
from ar2dlm.utils.files import write_json

log = logging.getLogger(__name__)

# Held-out accuracy is always measured with uniform masking and a fixed seed, so numbers compare across recipes.
HELDOUT_MASKING = MaskingConfig(strategy="uniform")
HELDOUT_SEED = 1234


def self_corpus_path(cfg: ConvertConfig) -> Path:
    """Cache location of the base model's own corpus, keyed by everything that changes its content."""
    key = json.dumps([resolve_model_source(cfg.model), cfg.self_samples, cfg.self_max_new_tokens,
                      cfg.self_answer_temperature, cfg.seed])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "self-corpus" / f"{Path(cfg.model).name}-{digest}.jsonl"


def prepare_examples(cfg: ConvertConfig, backbone, tokenizer, info) -> list:
    """Tokenised examples, built on the main rank (which may first have the base model write its corpus)."""
    examples = None
    if info.is_main:
        corpus = None
        if cfg.data == "self":
            from ar2dlm.training.selfgen import generate_self_corpus

            corpus = self_corpus_path(cfg)
            generate_self_corpus(backbone, tokenizer, n_samples=cfg.self_samples,
                                 max_new_tokens=cfg.self_max_new_tokens, cache_path=corpus, seed=cfg.seed,
                                 batch_size=16, answer_temperature=cfg.self_answer_temperature)
        data_cfg = DataConfig(source=cfg.data, seq_len=cfg.seq_len, max_records=cfg.max_records)
        examples = load_examples(data_cfg, tokenizer, self_corpus_path=corpus)
        if len(examples) <= cfg.heldout:
            raise Ar2dlmError(f"only {len(examples)} examples from {cfg.data}: not enough beyond --heldout {cfg.heldout}")
    return distributed.broadcast_object(examples, info)


def noised_heldout(heldout, cfg: ConvertConfig, mask_id: int, pad_id: int) -> list:
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    return [_noise(b, cfg, mask_id, HELDOUT_MASKING, gen) for b in iter_batches(heldout, cfg.batch_size, pad_id)]


class _Noised:
    __slots__ = ("noisy_ids", "clean_ids", "masked", "lengths")

    def __init__(self, noisy_ids, clean_ids, masked, lengths):
        self.noisy_ids, self.clean_ids, self.masked, self.lengths = noisy_ids, clean_ids, masked, lengths

    def to(self, device):
        return _Noised(*(t.to(device) for t in (self.noisy_ids, self.clean_ids, self.masked, self.lengths)))


def _noise(batch, cfg: ConvertConfig, mask_id: int, masking: MaskingConfig, gen) -> _Noised:
    nb = noise_batch(batch.input_ids, scorable(batch.maskable, cfg.token_shift), cfg.block_size, mask_id, masking,
                     generator=gen)
    reps = nb.noisy_ids.shape[0] // batch.input_ids.shape[0]  # 2 with complementary masking
    return _Noised(nb.noisy_ids, nb.clean_ids, nb.masked, batch.lengths.repeat(reps))


def convert(cfg: ConvertConfig) -> dict:
    """Run a conversion; returns the summary that is also written to <output>/summary.json."""
    info, device = distributed.init(cfg.device)
    try:
        return _convert(cfg, info, device)
    finally:
        distributed.shutdown()


def _convert(cfg: ConvertConfig, info, device) -> dict:
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoint"
    if cfg.resume and not checkpoint.exists(ckpt_dir):
        raise Ar2dlmError(f"--resume given but there is no checkpoint in {ckpt_dir}")
    if not cfg.resume and checkpoint.exists(ckpt_dir):
        raise Ar2dlmError(f"{out} already holds a run: pass --resume to continue it, or choose another --output")
    torch.manual_seed(cfg.seed)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    backbone, tokenizer = load_base(cfg.model, dtype=torch.float32)
    examples = prepare_examples(cfg, backbone, tokenizer, info)
    train_ex, heldout_ex = split_heldout(examples, cfg.heldout, seed=cfg.seed)

    dlm = BlockDiffusionLM.from_base(backbone, tokenizer, cfg.block_size, cfg.token_shift, cfg.mask_token,
                                     base_model=resolve_model_source(cfg.model))
    if cfg.lora_rank:
        dlm.apply_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        dlm.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dlm.to(device)
    if device.type == "cuda":
        dlm.set_attention_backend("flex")
    dlm.train()

    objective = DiffusionObjective(dlm)
    model = distributed.wrap(objective, info, device, cfg.fsdp, decoder_layers=dlm.backbone.get_decoder().layers)
    optimizer = build_optimizer(objective, cfg.lr, cfg.weight_decay)
    pad_id = tokenizer.pad_token_id
    batcher = Batcher(train_ex, cfg.batch_size, seed=cfg.seed, pad_id=pad_id, rank=info.rank,
                      world_size=info.world_size)
    noise_gen = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank)
    masking = MaskingConfig(strategy=cfg.masking, eps=cfg.mask_eps, half_life=cfg.half_life,
                            complementary=cfg.complementary)
    heldout = [b.to(device) for b in noised_heldout(heldout_ex, cfg, dlm.config.mask_token_id, pad_id)] \
        if heldout_ex else []

    state = {"step": 0, "tokens": 0, "train_seconds": 0.0, "before": None}
    if cfg.resume:
        state = checkpoint.load(ckpt_dir, module=objective, optimizer=optimizer, fsdp=cfg.fsdp)
        batcher.load_state_dict(state["batcher"][info.rank])
        noise_gen.set_state(state["noise_rng"][info.rank])
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=state["step"] if cfg.resume else None)
    if info.is_main:
        write_json(out / "config.json", asdict(cfg))
    if state["before"] is None:
        state["before"] = heldout_metrics(model, heldout, autocast) if heldout else {}
        if info.is_main:
            metrics.write({"step": 0, **state["before"]})

    def save_checkpoint():
        batcher_states = _gather(batcher.state_dict(), info)
        noise_states = _gather(noise_gen.get_state(), info)
        trainer_state = {**state, "batcher": batcher_states, "noise_rng": noise_states}
        checkpoint.save(ckpt_dir, module=objective, optimizer=optimizer, trainer_state=trainer_state, fsdp=cfg.fsdp,
                        is_main=info.is_main)

    batches = iter(batcher)
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="convert", disable=not info.is_main, dynamic_ncols=True)
    t_start = time.perf_counter() - state["train_seconds"]
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    stopped_early = False
    while state["step"] < cfg.max_steps:
        t0 = time.perf_counter()
        micro = [_noise(next(batches), cfg, dlm.config.mask_token_id, masking, noise_gen).to(device)
                 for _ in range(cfg.grad_accum)]
        n_masked = distributed.all_reduce_sum(torch.tensor(float(sum(int(m.masked.sum()) for m in micro)),
                                                           device=device)).item()
        ce_total, correct_total = 0.0, 0
        for i, mb in enumerate(micro):
            sync = contextlib.nullcontext() if (i == len(micro) - 1 or not hasattr(model, "no_sync")) \
                else model.no_sync()
            with sync, autocast():
                ce, correct = model(mb.noisy_ids, mb.clean_ids, mb.masked, mb.lengths)
                # DDP averages gradients over ranks; scaling by world/n_masked makes it a global per-token mean.
                (ce * info.world_size / max(n_masked, 1.0)).backward()
            ce_total += ce.item()
            correct_total += correct.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip or float("inf"))
        decay = progress(state["step"], cfg.warmup_steps, cfg.max_steps, time.perf_counter() - t_start, budget_s)
        lr = cfg.lr * lr_factor(state["step"], cfg.warmup_steps, decay, cfg.min_lr_ratio)
        if info.enabled:  # wall-clock progress differs by a hair between ranks: all use the main rank's LR
            lr = distributed.broadcast_object(lr, info)
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        stats = distributed.all_reduce_sum(torch.tensor([ce_total, float(correct_total)], device=device))
        step_tokens = int(distributed.all_reduce_sum(
            torch.tensor(float(sum(int(m.lengths.sum()) for m in micro)), device=device)).item())
        state["step"] += 1
        state["tokens"] += step_tokens
        dt = time.perf_counter() - t0
        state["train_seconds"] = time.perf_counter() - t_start
        loss = stats[0].item() / max(n_masked, 1.0)
        acc = stats[1].item() / max(n_masked, 1.0)
        if info.is_main and (state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps):
            metrics.write({"step": state["step"], "loss": loss, "masked_acc": acc, "lr": lr,
                           "grad_norm": float(grad_norm), "tokens": state["tokens"], "tokens_per_s": step_tokens / dt,
                           "elapsed_s": round(state["train_seconds"], 2)})
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}", tok_s=f"{step_tokens / dt:.0f}")
        bar.update(1)
        if cfg.eval_every and state["step"] % cfg.eval_every == 0 and heldout:
            ev = heldout_metrics(model, heldout, autocast)
            if info.is_main:
                metrics.write({"step": state["step"], **ev})
        out_of_time = budget_s is not None and state["train_seconds"] >= budget_s
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.max_steps or out_of_time:
            save_checkpoint()
        if os.environ.get("AR2DLM_FAULT_AT_STEP") == str(state["step"]):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: the resume test kills a run exactly here
        if out_of_time and state["step"] < cfg.max_steps:
            stopped_early = True
            log.warning("time budget of %.1f min reached at step %d", cfg.max_minutes, state["step"])
            break
    bar.close()

    after = heldout_metrics(model, heldout, autocast) if heldout else {}
    # equal on every rank when DDP kept them in sync (FSDP ranks hold different shards: nothing to compare)
    checksums = None if cfg.fsdp else _gather(param_checksum(objective), info)
    summary = {
        "model": cfg.model, "output": str(out / "model"), "steps": state["step"], "tokens": state["tokens"],
        "train_seconds": round(state["train_seconds"], 1), "stopped_early": stopped_early,
        "heldout_before": state["before"], "heldout_after": after, "dlm": asdict(dlm.config),
        "lora_rank": cfg.lora_rank, "world_size": info.world_size, "rank_param_checksums": checksums,
    }
    final = _unsharded(cfg, objective, tokenizer) if (cfg.fsdp and info.enabled) else dlm
    if info.is_main:
        metrics.write({"step": state["step"], **after})
        final.save_pretrained(out / "model", tokenizer)
        plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"{Path(cfg.model).name} -> dLM (B={cfg.block_size})")
        summary["samples"] = fill_in_samples(final, tokenizer, [b.to(final.device) for b in heldout[:1]], n=3)
        write_json(out / "summary.json", summary)
    distributed.barrier()
    return summary


def _unsharded(cfg: ConvertConfig, objective, tokenizer):
    """Under FSDP the weights are spread over ranks: gather a full copy (collective) into a plain dLM on the main
    rank, to save it as a normal checkpoint. Other ranks get None."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    backbone, _ = load_base(cfg.model, dtype=torch.float32)
    plain = BlockDiffusionLM.from_base(backbone, tokenizer, cfg.block_size, cfg.token_shift, cfg.mask_token,
                                       base_model=resolve_model_source(cfg.model))
    if cfg.lora_rank:
        plain.apply_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    missing, unexpected = plain.load_state_dict({k.removeprefix("dlm."): v for k, v in full.items()}, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"FSDP gather mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return plain


@torch.no_grad()
def param_checksum(module) -> float:
    """A cheap fingerprint of the trainable weights (sum of |w| * position-dependent factor)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(q for q in module.parameters() if q.requires_grad):
        local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 shards: the rank's own piece
        total += local.detach().double().abs().sum().cpu() * (1 + (i % 7) / 10)
    return float(total)


def _gather(obj, info) -> list:
    """Every rank's `obj`, in rank order (data positions and RNG states differ per rank)."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    box = [None] * info.world_size
    dist.all_gather_object(box, obj)
    return box


@torch.no_grad()
def fill_in_samples(dlm: BlockDiffusionLM, tokenizer, heldout_batches, n: int = 3) -> list[dict]:
    """A look at what the model learned: held-out rows with masked tokens shown beside the model's guesses."""
    if not heldout_batches:
        return []
    b = heldout_batches[0]
    was = dlm.training
    dlm.eval()
    hidden = dlm.predictor_hidden(dlm.training_hidden(b.noisy_ids, b.clean_ids, b.lengths))
    guesses = dlm.logits(hidden).argmax(-1)
    dlm.train(was)
    rows = []
    for r in range(min(n, b.clean_ids.shape[0])):
        idx = b.masked[r].nonzero().flatten()[:24]
        if idx.numel() == 0:
            continue
        lo, hi = max(0, int(idx[0]) - 8), int(idx[-1]) + 1
        shown = [f"[{tokenizer.decode([int(g)])}|{tokenizer.decode([int(t)])}]" if m else tokenizer.decode([int(t)])
                 for t, g, m in zip(b.clean_ids[r, lo:hi], guesses[r, lo:hi], b.masked[r, lo:hi])]
        rows.append({"text": "".join(shown), "correct": int((guesses[r][idx] == b.clean_ids[r][idx]).sum()),
                     "masked": int(idx.numel())})
    return rows
