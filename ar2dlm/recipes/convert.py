"""`ar2dlm convert`: continuous pretraining that turns a causal LM into a block-diffusion LM (Efficient-DLM recipe).

One path for the data: records -> examples (tokens + which are maskable) -> padded batches -> noised batches
([noisy | clean] layout) -> summed masked-token cross-entropy -> per-token mean over the global batch.

With --drafter the same job trains a gated drafter instead (drafter/gated_training.py): the parent stays frozen and
exact, the loss is the drafter objective's, and the held-out check adds the drafts a verify decoder would accept.
With --drafter-kind feature it trains a feature drafter on the parent's cached hidden states
(drafter/feature_training.py).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ar2dlm.data.batching import Batcher, iter_batches
from ar2dlm.data.tokenize import DataConfig, load_examples, split_heldout
from ar2dlm.drafter import feature_training
from ar2dlm.drafter.gated_eval import DrafterTrainer
from ar2dlm.drafter.gated_objective import DrafterObjective
from ar2dlm.drafter.gated_training import drafter_heldout, drafter_micro, drafter_summary, prepare_drafter
from ar2dlm.errors import Ar2dlmError
from ar2dlm.masking import MaskingConfig, noise_batch
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.loading import load_base, resolve_model_source
from ar2dlm.training import distributed
from ar2dlm.training.config import ConvertConfig
from ar2dlm.training.loss import DiffusionObjective, scorable
from ar2dlm.training.optim import build_optimizer
from ar2dlm.training.runs import complete_run, finish_run, prepare_dlm, print_summary
from ar2dlm.training.selfgen import (generate_self_corpus, parent_answers_path, self_corpus_path,
                                     write_parent_answers)
from ar2dlm.training.trainer import MaskedBatch, Trainer, check_run_folder
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
from ar2dlm.utils.files import write_json

log = logging.getLogger(__name__)

# Held-out accuracy is always measured with uniform masking and a fixed seed, so numbers compare across recipes.
HELDOUT_MASKING = MaskingConfig(strategy="uniform")
HELDOUT_SEED = 1234


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, ConvertConfig)


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    return dataclass_from_args(ConvertConfig, args)


def prepare_examples(cfg: ConvertConfig, backbone, tokenizer, info) -> list:
    """Tokenised examples, built on the main rank (which may first have the base model write its corpus)."""
    examples = None
    if info.is_main:
        corpus, source = None, cfg.data
        if cfg.data == "self":
            corpus = self_corpus_path(cfg)
            generate_self_corpus(backbone, tokenizer, n_samples=cfg.self_samples,
                                 max_new_tokens=cfg.self_max_new_tokens, cache_path=corpus, seed=cfg.seed,
                                 batch_size=16, answer_temperature=cfg.self_answer_temperature)
        elif cfg.answers_from_parent:
            source = str(write_parent_answers(
                backbone, tokenizer, cfg.data, parent_answers_path(cfg), cfg.max_records, cfg.self_max_new_tokens,
                cfg.self_answer_temperature, cfg.seed))
        data_cfg = DataConfig(source=source, seq_len=cfg.seq_len, max_records=cfg.max_records)
        examples = load_examples(data_cfg, tokenizer, self_corpus_path=corpus)
        if len(examples) <= cfg.heldout:
            raise Ar2dlmError(f"only {len(examples)} examples from {cfg.data}: not enough beyond --heldout {cfg.heldout}")
    return distributed.broadcast_object(examples, info)


def noised_heldout(heldout, cfg: ConvertConfig, mask_id: int, pad_id: int) -> list:
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    return [_noise(b, cfg, mask_id, HELDOUT_MASKING, gen) for b in iter_batches(heldout, cfg.batch_size, pad_id)]


def _noise(batch, cfg: ConvertConfig, mask_id: int, masking: MaskingConfig, gen) -> MaskedBatch:
    nb = noise_batch(batch.input_ids, scorable(batch.maskable, cfg.token_shift), cfg.block_size, mask_id, masking,
                     generator=gen)
    reps = nb.noisy_ids.shape[0] // batch.input_ids.shape[0]  # 2 with complementary masking
    return MaskedBatch(nb.noisy_ids, nb.clean_ids, nb.masked, batch.lengths.repeat(reps))


def run(cfg: ConvertConfig) -> dict:
    """Run a conversion (every rank under torchrun); returns the summary also written to <output>/summary.json, and
    prints it on the main rank."""
    with distributed.session(cfg.device) as (info, device):
        summary = _convert(cfg, info, device)
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(summary)
        for s in summary.get("samples", []):
            print(f"[guess|truth] {s['correct']}/{s['masked']} correct: {s['text']!r}")
    return summary


def _model_and_trainer(cfg: ConvertConfig, info, device, backbone, tokenizer):
    """(the model to train, its objective, the trainer): a dLM, or with --drafter a gated drafter on the parent."""
    if cfg.drafter:
        dlm = prepare_drafter(cfg, device, backbone, tokenizer)
        objective = DrafterObjective(dlm, cfg.drafter_target)
    else:
        dlm = prepare_dlm(cfg, device, backbone, tokenizer)
        objective = DiffusionObjective(dlm)
    model = distributed.wrap(objective, info, device, cfg.fsdp, decoder_layers=dlm.backbone.get_decoder().layers)
    trainer = (DrafterTrainer if cfg.drafter else Trainer)(
        cfg, info=info, device=device, objective=objective, model=model, out=Path(cfg.output), desc="convert",
        optimizer=build_optimizer(objective, cfg.lr, cfg.weight_decay))
    return dlm, objective, trainer


def _set_heldout(trainer, dlm, heldout_ex, cfg: ConvertConfig, pad_id: int, device) -> None:
    """The held-out micro-batches (and for a drafter its draft-acceptance probes), fixed for the whole run."""
    if heldout_ex and cfg.drafter:
        trainer.heldout, trainer.probes = drafter_heldout(dlm, iter_batches(heldout_ex, cfg.batch_size, pad_id), cfg,
                                                          device)
    elif heldout_ex:
        trainer.heldout = [b.to(device) for b in noised_heldout(heldout_ex, cfg, dlm.config.mask_token_id, pad_id)]


def _convert(cfg: ConvertConfig, info, device) -> dict:
    if cfg.drafter_kind == "feature":
        return feature_training.train(cfg, info, device, prepare_examples)
    out = Path(cfg.output)
    check_run_folder(cfg)
    torch.manual_seed(cfg.seed)
    backbone, tokenizer = load_base(cfg.model, dtype=torch.float32)
    dlm, objective, trainer = _model_and_trainer(cfg, info, device, backbone, tokenizer)
    examples = prepare_examples(cfg, backbone, tokenizer, info)
    train_ex, heldout_ex = split_heldout(examples, cfg.heldout, seed=cfg.seed)
    pad_id = tokenizer.pad_token_id
    _set_heldout(trainer, dlm, heldout_ex, cfg, pad_id, device)
    if info.is_main:
        write_json(out / "config.json", asdict(cfg))

    batcher = Batcher(train_ex, cfg.batch_size, seed=cfg.seed, pad_id=pad_id, rank=info.rank,
                      world_size=info.world_size)
    noise_gen = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank)
    masking = MaskingConfig(strategy=cfg.masking, eps=cfg.mask_eps, half_life=cfg.half_life,
                            complementary=cfg.complementary)

    def load_data_state(s):
        batcher.load_state_dict(s["batcher"])
        noise_gen.set_state(s["noise_rng"])

    batches = iter(batcher)
    micro = drafter_micro if cfg.drafter else _noise
    after = trainer.run(next_micro=lambda fraction: micro(next(batches), cfg, dlm.config.mask_token_id, masking,
                                                          noise_gen),
                        data_state=lambda: {"batcher": batcher.state_dict(), "noise_rng": noise_gen.get_state()},
                        load_data_state=load_data_state)
    final = _unsharded(cfg, objective, tokenizer) if (cfg.fsdp and info.enabled) else dlm
    kind = "drafter" if cfg.drafter else "dLM"
    summary = finish_run(cfg, trainer, after, final, tokenizer, title=f"{Path(cfg.model).name} -> {kind} "
                                                                      f"(B={cfg.block_size})")
    if cfg.drafter:
        summary["drafter"] = drafter_summary(cfg, trainer.state["before"], after)
    if info.is_main:
        summary["samples"] = fill_in_samples(final, tokenizer, trainer.heldout[:1], n=3)
    complete_run(cfg, summary, info)
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
