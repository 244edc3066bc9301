"""`ar2dlm distill`: pseudo-trajectory distillation (d3LLM) of a converted dLM, so it commits more tokens a forward.

One path for the data: records (chat / instruction / `self`) -> targets (the record's answer, or the teacher's own
answer) -> trajectories (the teacher's decoding order, `trajectories.py`, cached in the output folder) -> samples
masked by that order under a curriculum (`samples.py`) -> CE + complementary CE + entropy term (`loss.py`) -> the
shared trainer (accumulation, DDP, checkpoints, exact resume, metrics, plot).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ar2dlm.data.batching import Batcher
from ar2dlm.data.tokenize import DataConfig, Example, load_examples, split_heldout
from ar2dlm.distillation.loss import DistillObjective
from ar2dlm.distillation.samples import SampleConfig, block_size_at, build_micro
from ar2dlm.distillation.trajectories import RANK_BY, Trajectory, read_trajectories, write_trajectories
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.loading import resolve_dlm_path
from ar2dlm.model.open import check_not_run_folder, load_dlm, parent_spec
from ar2dlm.training import distributed
from ar2dlm.training.config import ConvertConfig, TrainConfig, option
from ar2dlm.training.optim import build_optimizer
from ar2dlm.training.runs import complete_run, finish_run, prepare_dlm, print_summary
from ar2dlm.training.selfgen import generate_self_corpus, self_corpus_path
from ar2dlm.training.trainer import Trainer, check_run_folder
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
from ar2dlm.utils.files import write_json

log = logging.getLogger(__name__)

HELDOUT_SEED = 1234


@dataclass
class DistillConfig(TrainConfig):
    model: str = option("runs/smollm2-135m-convert/model", "the converted dLM to distill (the student)")
    output: str = option("runs/distill", "output folder: distilled dLM, trajectories, checkpoints, metrics, plot")
    teacher: str | None = option(None, "teacher dLM for the trajectories (default: the student as it starts)")
    data: str = option("self", "prompts and answers: a chat/instruction file, a hub id, or 'self' (the base model's "
                             "own corpus, as in convert)")
    trajectories: str | None = option(None, "reuse this trajectory file (default: <output>/trajectories.jsonl)")
    target: str = option("reference", "what the student learns to write: the record's answer, or the teacher's own",
                       choices=["reference", "teacher"])
    rank_by: str = option("confidence", "the teacher's one-token-a-forward order", choices=list(RANK_BY))
    max_records: int | None = option(None, "use at most this many data records")
    seq_len: int = option(320, "longest sequence (prompt + answer) in tokens")
    teacher_max_new_tokens: int = option(160, "answer length limit with --target teacher")
    teacher_batch_size: int = option(8, "sequences per teacher forward (generation and replay)")
    grade: str = option("none", "with --target teacher: keep only correct answers (one retry at temperature 0.3)",
                      choices=["none", "gsm8k"])
    order: str = option("trajectory", "what decides the masked tokens: the teacher's order or random (ablation)",
                      choices=["trajectory", "random"])
    ratio_max: float = option(0.8, "largest in-block mask ratio r")
    curriculum: bool = option(True, "the floor of r rises linearly from 0 to ratio_max over training")
    block_sizes: str | None = option(None, "student block sizes over training, in equal stages, e.g. 4,8 (the saved "
                                         "model uses the last; default: the teacher's block size throughout)")
    complementary: bool = option(True, "also train on the complement of every mask")
    entropy_weight: float = option(1.0, "weight of the entropy term on correctly predicted masked tokens")
    entropy_temperature: float = option(0.5, "temperature of the softmax whose entropy is minimised")
    lr: float = option(5e-5, "peak learning rate")
    max_steps: int = option(100, "optimizer steps (the schedule's length)")
    heldout: int = option(16, "trajectories held out for masked-token accuracy")

    def __post_init__(self):
        super().__post_init__()
        SampleConfig(self.ratio_max, self.curriculum, self.order, self.complementary)  # validates
        if self.fsdp:
            raise Ar2dlmError("distill runs with DDP under torchrun; --fsdp is only supported by convert")
        if self.entropy_weight < 0 or self.entropy_temperature <= 0:
            raise Ar2dlmError("--entropy-weight must be >= 0 and --entropy-temperature > 0")
        if self.grade != "none" and self.target != "teacher":
            raise Ar2dlmError("--grade filters the teacher's answers: it needs --target teacher")
        if self.seq_len < 8 or self.teacher_max_new_tokens < 1 or self.teacher_batch_size < 1:
            raise Ar2dlmError("--seq-len must be >= 8, --teacher-max-new-tokens and --teacher-batch-size >= 1")
        if self.max_records is not None and self.max_records < 1:
            raise Ar2dlmError(f"--max-records must be >= 1, got {self.max_records}")
        self.block_size_stages()  # validates

    def block_size_stages(self) -> tuple[int, ...]:
        """--block-sizes as a tuple of ints (empty: keep the teacher's block size)."""
        if not self.block_sizes:
            return ()
        try:
            sizes = tuple(int(x) for x in str(self.block_sizes).split(","))
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1:
            raise Ar2dlmError(f"--block-sizes must be comma-separated positive integers, got {self.block_sizes!r}")
        return sizes

    def sample_config(self) -> SampleConfig:
        return SampleConfig(self.ratio_max, self.curriculum, self.order, self.complementary)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, DistillConfig)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    return dataclass_from_args(DistillConfig, args)


# -------------------------------------------------------------------------------------------------- data
def load_records(cfg: DistillConfig, dlm: BlockDiffusionLM, tokenizer) -> list[Example]:
    """Tokenised records; `self` is the base model's own corpus (written first if it is not cached yet)."""
    corpus = None
    if cfg.data == "self":
        base = parent_spec(dlm, missing="--data self needs it (the base model's own corpus)")
        cc = ConvertConfig(model=base, seed=0)
        corpus = self_corpus_path(cc)
        if not corpus.exists():
            from ar2dlm.model.loading import load_base

            backbone, base_tok = load_base(base, dtype=torch.float32)
            generate_self_corpus(backbone, base_tok, n_samples=cc.self_samples, max_new_tokens=cc.self_max_new_tokens,
                                 cache_path=corpus, seed=cc.seed, batch_size=16,
                                 answer_temperature=cc.self_answer_temperature)
    examples = load_examples(DataConfig(source=cfg.data, seq_len=cfg.seq_len, max_records=cfg.max_records),
                             tokenizer, self_corpus_path=corpus)
    # Trajectories are single answers after a prompt; packed plain text has no prompt to condition on.
    examples = [e for e in examples if e.maskable and not e.maskable[0]]
    if len(examples) <= cfg.heldout:
        raise Ar2dlmError(f"only {len(examples)} prompt/answer records in {cfg.data}: need more than --heldout "
                          f"{cfg.heldout}")
    return examples


def _prompt(e: Example) -> list[int]:
    return e.input_ids[:e.maskable.index(True)]


def teacher_answers(teacher: BlockDiffusionLM, tokenizer, cfg: DistillConfig):
    """A `make_targets` function: each example's prompt followed by the teacher's own one-token-a-forward answer."""
    from ar2dlm.engine import DecodeParams, Engine
    from ar2dlm.evaluation.tasks.gsm8k import answers_match, extract_answer

    engine = Engine(teacher, tokenizer)
    policy = {"confidence": dict(policy="steps", steps_per_forward=1), "entropy": dict(policy="entropy", tau=0.0),
              "target": dict(policy="steps", steps_per_forward=1)}[cfg.rank_by]

    def correct(e: Example, answer: list[int]) -> bool:
        reference = tokenizer.decode([t for t, m in zip(e.input_ids, e.maskable) if m], skip_special_tokens=True)
        expected, _ = extract_answer(reference)
        got, _ = extract_answer(tokenizer.decode(answer, skip_special_tokens=True))
        return expected is not None and answers_match(got, expected)

    def make(group: list[Example]) -> list[Example]:
        prompts = [_prompt(e) for e in group]
        room = [min(cfg.teacher_max_new_tokens, cfg.seq_len - len(p)) for p in prompts]
        results = engine.generate_batch(prompts, DecodeParams(max_new_tokens=max(1, max(room)), **policy))
        answers = [r.tokens[:n] for r, n in zip(results, room)]
        if cfg.grade == "gsm8k":
            wrong = [i for i, (e, a) in enumerate(zip(group, answers)) if not correct(e, a)]
            if wrong:
                retry = engine.generate_batch([prompts[i] for i in wrong],
                                              DecodeParams(max_new_tokens=max(1, max(room)), temperature=0.3,
                                                           seed=cfg.seed, **policy))
                for i, r in zip(wrong, retry):
                    answers[i] = r.tokens[:room[i]] if correct(group[i], r.tokens[:room[i]]) else []
        return [Example(p + a, [False] * len(p) + [True] * len(a)) if a else None for p, a in zip(prompts, answers)]

    return make


def truncate(trajs: list[Trajectory], seq_len: int, block_size: int) -> list[Trajectory]:
    """Trajectories cut to at most `seq_len` tokens, at a block boundary (so every kept block keeps all its ranks);
    those left without any generated token are dropped."""
    keep = max(block_size, seq_len // block_size * block_size)
    cut = [Trajectory(t.input_ids[:keep], t.rank[:keep]) if len(t) > seq_len else t for t in trajs]
    return [t for t in cut if any(r >= 0 for r in t.rank)]


def prepare_trajectories(cfg: DistillConfig, dlm: BlockDiffusionLM, tokenizer, info) -> list:
    """Trajectories, recorded on the main rank (or read from a given/cached file) and shared with all ranks."""
    trajs = None
    if info.is_main:
        path = Path(cfg.trajectories) if cfg.trajectories else Path(cfg.output) / "trajectories.jsonl"
        if cfg.trajectories and not path.exists():
            raise Ar2dlmError(f"no trajectory file at {path}")
        if not path.exists():
            teacher = dlm
            if cfg.teacher:
                check_not_run_folder(cfg.teacher, "--teacher")
                teacher, _ = load_dlm(cfg.teacher, device=dlm.device)
                if teacher.config.block_size != dlm.config.block_size:
                    raise Ar2dlmError(f"teacher block size {teacher.config.block_size} != student's "
                                      f"{dlm.config.block_size}")
            records = load_records(cfg, dlm, tokenizer)
            meta = {"block_size": dlm.config.block_size, "teacher": cfg.teacher or cfg.model,
                    "rank_by": cfg.rank_by, "target": cfg.target}
            make = teacher_answers(teacher, tokenizer, cfg) if cfg.target == "teacher" else None
            write_trajectories(path, records, teacher, tokenizer.pad_token_id, rank_by=cfg.rank_by, meta=meta,
                               batch_size=cfg.teacher_batch_size, make_targets=make)
            del teacher
        trajs = truncate(read_trajectories(path, dlm.config.block_size), cfg.seq_len, dlm.config.block_size)
        if len(trajs) <= cfg.heldout:
            raise Ar2dlmError(f"only {len(trajs)} trajectories (some answers may have been filtered out): need "
                              f"more than --heldout {cfg.heldout}")
    return distributed.broadcast_object(trajs, info)


# -------------------------------------------------------------------------------------------------- run
def run(cfg: DistillConfig) -> dict:
    """Run a distillation (every rank under torchrun); returns the summary also written to <output>/summary.json,
    and prints it on the main rank."""
    with distributed.session(cfg.device) as (info, device):
        summary = _distill(cfg, info, device)
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(summary)
    return summary


def _load_student(cfg: DistillConfig, path: Path, device):
    """The converted dLM to distill and its tokenizer. With --lora-rank a student's own adapter stays unmerged, and a
    student without one becomes the base the new adapter loads on."""
    if not path.is_dir():
        raise Ar2dlmError(f"no dLM checkpoint at {path} (convert a model first: ar2dlm convert)")
    check_not_run_folder(cfg.model)
    dlm, tokenizer = load_dlm(path, merge_lora=not cfg.lora_rank, device=device)
    if cfg.lora_rank and not dlm.is_lora:
        dlm.config.base_model = str(path.resolve())  # the adapter then loads on top of the student checkpoint
    return dlm, tokenizer


def _heldout_batches(cfg: DistillConfig, held: list, block_size: int, teacher_block: int, mask_id: int, pad_id: int,
                     device) -> list:
    """Held-out micro-batches with fixed masks (their own seeded generator, so every evaluation sees the same ones)
    at `block_size`, the final one: the teacher's order, r ~ U[0, ratio_max], no curriculum."""
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    fixed = SampleConfig(cfg.ratio_max, curriculum=False, order="trajectory", complementary=False)
    return [build_micro(held[i:i + cfg.batch_size], block_size, mask_id, pad_id, fixed, 0.0, g,
                        teacher_block=teacher_block).to(device)
            for i in range(0, len(held), cfg.batch_size)]


def _distill(cfg: DistillConfig, info, device) -> dict:
    out = Path(cfg.output)
    check_run_folder(cfg)
    torch.manual_seed(cfg.seed)
    path = resolve_dlm_path(cfg.model)
    dlm, tokenizer = _load_student(cfg, path, device)
    trajs = prepare_trajectories(cfg, dlm, tokenizer, info)
    train, held = split_heldout(trajs, cfg.heldout, seed=cfg.seed)

    dlm = prepare_dlm(cfg, device, None, tokenizer, dlm=dlm)
    objective = DistillObjective(dlm, cfg.entropy_weight, cfg.entropy_temperature)
    model = distributed.wrap(objective, info, device, False)
    trainer = Trainer(cfg, info=info, device=device, objective=objective, model=model, out=out, desc="distill",
                      optimizer=build_optimizer(objective, cfg.lr, cfg.weight_decay))
    B, mask_id, pad_id = dlm.config.block_size, dlm.config.mask_token_id, tokenizer.pad_token_id
    sizes = cfg.block_size_stages() or (B,)  # trajectories are recorded at B, the student's starting block size
    scfg = cfg.sample_config()
    if held:
        trainer.heldout = _heldout_batches(cfg, held, sizes[-1], B, mask_id, pad_id, device)
    if info.is_main:
        write_json(out / "config.json", asdict(cfg))

    batcher = Batcher(train, cfg.batch_size, seed=cfg.seed, pad_id=pad_id, rank=info.rank,
                      world_size=info.world_size)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank)

    def next_micro(fraction: float):
        return build_micro([train[i] for i in batcher.next_indices()], block_size_at(fraction, sizes), mask_id,
                           pad_id, scfg, fraction, gen, teacher_block=B)

    def load_data_state(s):
        batcher.load_state_dict(s["batcher"])
        gen.set_state(s["rng"])

    after = trainer.run(next_micro, data_state=lambda: {"batcher": batcher.state_dict(), "rng": gen.get_state()},
                        load_data_state=load_data_state)
    dlm.config.block_size = sizes[-1]
    title = f"distill {path.name} (B={'->'.join(map(str, sizes))})"
    summary = finish_run(cfg, trainer, after, dlm, tokenizer, title=title)
    summary.update(block_sizes=list(sizes), trajectories=len(trajs), generated_tokens=sum(sum(t.maskable) for t in trajs),
                   sample_config=asdict(scfg))
    complete_run(cfg, summary, info)
    distributed.barrier()
    return summary
