"""`ar2dlm generate`: answer one prompt with the cached engine, print the text and a one-line metrics summary.

`DecodeOptions` (and `ModelOption`) are the command-line options shared with `ar2dlm chat`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ar2dlm.engine import DecodeParams, Engine, GenerationResult, encode_prompt
from ar2dlm.engine.policies import POLICIES
from ar2dlm.model.dlm import ADAPTER_CONFIG_FILE, BlockDiffusionLM
from ar2dlm.utils.files import check_output_file


@dataclass(kw_only=True)
class DecodeOptions:
    """The decoding options of `ar2dlm generate` and `ar2dlm chat`: one definition of each flag, for both."""

    policy: str = field(default="threshold", metadata={"help": "commit policy", "choices": list(POLICIES)})
    tau: float | None = field(default=None, metadata={"help": "threshold: confidence (0.9); entropy: nats (0.5)"})
    steps_per_forward: int = field(default=2, metadata={"help": "tokens per forward of the steps policy"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "sample among the k likeliest tokens (0 = all)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    stop: str | None = field(default=None, metadata={"help": "a stop string"})
    block_parallel: bool = field(default=False, metadata={"help": "multi-block decoding (several blocks at once)"})
    p_add: float = field(default=0.1, metadata={"help": "open a new block when the last one is this decoded"})
    cache_delay: int = field(default=1, metadata={"help": "forwards before a finished block counts as cached"})
    refresh_every: int = field(default=0, metadata={"help": "recompute the whole cache every N forwards (0: never)"})

    def decode_config(self) -> DecodeParams:
        return DecodeParams(
            max_new_tokens=self.max_new_tokens, policy=self.policy, tau=self.tau,
            steps_per_forward=self.steps_per_forward, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop_strings=() if self.stop is None else (self.stop,),  # '' is an error
            block_parallel=self.block_parallel, p_add=self.p_add, cache_delay=self.cache_delay,
            refresh_every=self.refresh_every,
        )


@dataclass(kw_only=True)
class ModelOption:
    model: str = field(metadata={"help": "dLM folder; a plain AR model (folder, .gguf, embedded name) runs as a "
                                         "block-size-1 dLM (use it with --policy ar)"})


@dataclass(kw_only=True)
class GenerateConfig(DecodeOptions, ModelOption):  # fields in the order ModelOption, DecodeOptions, own
    prompt: str = field(metadata={"help": "prompt text"})
    chat: bool = field(default=False, metadata={"help": "wrap the prompt as a user turn with the chat template"})
    stream: bool = field(default=False, metadata={"help": "print the text as it is decoded"})
    json_out: str | None = field(default=None, metadata={"help": "also write text and metrics here"})

    def __post_init__(self):
        check_output_file(self.json_out, "--json-out")  # before the model loads, not after the answer


def load_for_decoding(spec: str):
    """A saved dLM (full or LoRA), or any base AR model wrapped as a block-size-1 dLM (exactly the AR model)."""
    path = Path(spec).expanduser()
    if path.is_dir() and ((path / ADAPTER_CONFIG_FILE).exists() or _has_dlm_entry(path)):
        return BlockDiffusionLM.from_pretrained(path)
    from ar2dlm.model.loading import load_base

    model, tokenizer = load_base(spec)
    return BlockDiffusionLM.from_base(model, tokenizer, block_size=1), tokenizer


def _has_dlm_entry(path: Path) -> bool:
    try:
        return "dlm" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def run_generate(cfg: GenerateConfig) -> GenerationResult:
    dcfg = cfg.decode_config()  # validate the parameters before loading anything
    dlm, tokenizer = load_for_decoding(cfg.model)
    engine = Engine(dlm, tokenizer)
    ids = encode_prompt(tokenizer, cfg.prompt, chat=cfg.chat)
    if cfg.stream:
        stream = engine.stream(ids, dcfg)
        for delta in stream:
            print(delta, end="", flush=True)
        print()
        result = stream.result
    else:
        result = engine.generate(ids, dcfg)
        print(result.text)
    print(f"[{result.summary()}]", file=sys.stderr)
    if cfg.json_out:
        from ar2dlm.utils.files import write_json

        write_json(cfg.json_out, {"prompt": cfg.prompt, "text": result.text, "tokens": len(result.tokens),
                                  "nfe": result.nfe, "tpf": result.tpf, "tokens_per_s": result.tokens_per_s,
                                  "ttft_s": result.ttft_s, "stop_reason": result.stop_reason})
    return result
