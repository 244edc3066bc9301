"""Settings of a conversion run (`ar2dlm convert`). Every field is also a command-line option."""

from __future__ import annotations

from dataclasses import dataclass, field

from ar2dlm.errors import Ar2dlmError


def option(default, help: str, **extra):
    """A config field that is also a command-line option: its default, its help text, and argparse extras
    (`choices`, `flag`, `cli`) for `utils.cli_config.add_dataclass_args`."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings shared by `convert` and `distill`."""

    output: str = option("runs/train", "output folder: final model, checkpoints, metrics, plots")
    lr: float = option(1e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = option(10, "linear warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)")
    batch_size: int = option(4, "sequences per micro-batch per process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(120, "optimizer steps (the schedule's length)")
    max_minutes: float | None = option(None, "stop (and save) after this many minutes of training")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    lora_rank: int = option(0, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: int = option(32, "LoRA alpha")
    fsdp: bool = option(False, "shard the model with FSDP2 under torchrun (default: DDP)")
    heldout: int = option(32, "examples held out for masked-token accuracy")
    seed: int = option(0, "random seed")
    log_every: int = option(1, "steps between metric lines")
    eval_every: int = option(0, "steps between held-out evaluations (0: only before and after)")
    save_every: int = option(25, "steps between resumable checkpoints")
    resume: bool = option(False, "continue from the checkpoint in the output folder")
    keep_checkpoint: bool = option(False, "keep the resumable checkpoint/ (weights and optimizer state, about 3x the "
                                          "model) once the run has finished; it is always kept while it is unfinished")
    device: str = option("auto", "cpu, cuda or auto")

    def __post_init__(self):
        checks = [
            (self.lr > 0, "--lr must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
            (self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.max_minutes is None or self.max_minutes > 0, "--max-minutes must be > 0"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0 (0 disables clipping)"),  # < 0 would flip the gradient
            (self.lora_rank >= 0, "--lora-rank must be >= 0"),
            (self.heldout >= 0, "--heldout must be >= 0"),
            (self.log_every >= 1, "--log-every must be >= 1"),
            (self.eval_every >= 0, "--eval-every must be >= 0 (0: only before and after)"),
            (self.save_every >= 1, "--save-every must be >= 1"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be cpu, cuda or auto"),
        ]
        for ok, message in checks:
            if not ok:
                raise Ar2dlmError(message)


@dataclass
class ConvertConfig(TrainConfig):
    # what to convert
    model: str = option("smollm2-135m", "base AR model: embedded name, local folder, .gguf file or hub id")
    output: str = option("runs/convert", "output folder: final dLM, checkpoints, metrics, plots")
    # the dLM
    block_size: int = option(4, "diffusion block size B")
    token_shift: bool = option(True, "logit at i predicts token i+1 (reuses the AR head)")
    mask_token: str | None = option(None, "reuse this existing vocabulary token as mask (default: add a new row)")
    # masking
    masking: str = option("position", "noise schedule within a block", choices=["uniform", "position"])
    half_life: float = option(0.5, "position-dependent masking half-life ratio h (lambda = ln2 / (h*B))")
    mask_eps: float = option(1e-3, "smallest mask ratio drawn")
    complementary: bool = option(False, "also train every sequence on the complement of its mask")
    # data
    data: str = option("self", "training data: 'self' (the base model writes it), a local file, or a hub dataset id")
    seq_len: int = option(256, "tokens per training sequence")
    max_records: int | None = option(None, "use at most this many data records")
    self_samples: int = option(160, "records the base model writes for data=self")
    self_max_new_tokens: int = option(160, "tokens per answer the base model writes for data=self")
    self_answer_temperature: float = option(0.3, "sampling temperature of the answers for data=self (0 = greedy)")
    answers_from_parent: bool = option(False, "train on the parent's own answers to the data's prompts instead of "
                                              "the data's answers (written once, cached; --self-max-new-tokens and "
                                              "--self-answer-temperature apply, 0 = greedy)")
    # gated drafter (lossless mode): the parent stays exact, an adapter drafts at mask positions
    drafter: bool = option(False, "train a gated drafter instead of a dLM: the frozen parent computes every clean "
                                "position, a LoRA adapter (rank 32 unless --lora-rank) acts only on mask tokens")
    drafter_target: str = option("argmax", "what a drafter learns at masked positions: the data's tokens (text), the "
                                         "parent's teacher-forced argmax (CE) or its distribution (KL)",
                               choices=["text", "argmax", "distribution"])
    init_drafter: str | None = option(None, "start the drafter from a saved one (its folder or a shipped name such "
                                            "as smollm2-135m-dlm) and train it further, e.g. on new data")
    drafter_masking: str = option("full", "drafter masks: full = every maskable token (the fully masked block a "
                                        "verify decoder drafts from), schedule = --masking", choices=["full", "schedule"])
    drafter_kind: str = option("gated", "with --drafter: gated = LoRA on the parent acting on mask tokens; feature = "
                                        "a small block-diffusion model on the parent's cached hidden states "
                                        "(implies --drafter)", choices=["gated", "feature"])
    feature_layers: str | None = option(None, "feature drafter: the parent hidden states it reads, as layer counts "
                                              "(Hugging Face hidden_states entries; default low,mid,high: 2,L/2,L)")
    draft_layers: int = option(2, "feature drafter: its own decoder layers")
    feature_window: int = option(32, "feature drafter: committed positions whose features it reads")
    feature_cache: str | None = option(None, "feature drafter: the folder of the parent's features for the data "
                                             "(default: in the ar2dlm cache, by parent, data and layers)")
    anchors_per_sequence: int = option(64, "feature drafter: anchors (block starts) a micro-batch takes from one "
                                           "sequence at most")
    draft_vocab: int = option(8192, "feature drafter: it drafts only the most frequent answer tokens of the data "
                                    "(its LM head shrinks to them); 0 = the whole vocabulary")
    position_decay: float = option(0.8, "feature drafter: loss weight of draft k is decay^(k-1) (early drafts "
                                        "count most)")

    def __post_init__(self):
        super().__post_init__()
        if self.drafter_kind == "feature":
            self.drafter = True
        if self.drafter and self.lora_rank == 0:
            self.lora_rank = 32  # a drafter is always an adapter; 0 is the full fine-tuning default of a dLM
        checks = [
            (self.block_size >= 1, "--block-size must be >= 1"),
            (self.seq_len >= 2 * self.block_size, "--seq-len must be at least twice the block size"),
            (0 < self.mask_eps < 1, "--mask-eps must be in (0, 1)"),
            (self.half_life > 0, "--half-life must be > 0"),
            (self.max_records is None or self.max_records >= 1, "--max-records must be >= 1"),
            (self.self_samples >= 1 and self.self_max_new_tokens >= 1,
             "--self-samples and --self-max-new-tokens must be >= 1"),
            (self.self_answer_temperature >= 0, "--self-answer-temperature must be >= 0"),
            (not self.drafter or self.token_shift, "--drafter needs --token-shift (drafts extend the parent's token)"),
            (not self.drafter or not self.fsdp, "--drafter does not support --fsdp (use DDP: the adapter is small)"),
            (self.drafter_target in ("text", "argmax", "distribution"),
             "--drafter-target must be text, argmax or distribution"),
            (self.drafter_masking in ("full", "schedule"), "--drafter-masking must be full or schedule"),
            (self.drafter or self.init_drafter is None, "--init-drafter needs --drafter"),
            (self.drafter_kind in ("gated", "feature"), "--drafter-kind must be gated or feature"),
            (self.drafter_kind != "feature" or self.block_size >= 2,
             "--drafter-kind feature needs --block-size >= 2 (the last token and at least one draft)"),
            (self.draft_layers >= 1 and self.feature_window >= 1 and self.anchors_per_sequence >= 1,
             "--draft-layers, --feature-window and --anchors-per-sequence must be >= 1"),
            (0 < self.position_decay <= 1, "--position-decay must be in (0, 1]"),
            (self.feature_layers is None or all(x.strip().isdigit() for x in str(self.feature_layers).split(",")),
             "--feature-layers must be comma-separated layer counts, e.g. 2,15,30"),
            (self.draft_vocab >= 0, "--draft-vocab must be >= 0 (0: the whole vocabulary)"),
            (not (self.answers_from_parent and self.data == "self"),
             "--answers-from-parent needs a data file or dataset (data=self is already the parent's answers)"),
        ]
        for ok, message in checks:
            if not ok:
                raise Ar2dlmError(message)
