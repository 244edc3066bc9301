"""`ar2dlm generate`: answer one prompt with the cached engine, print the text and a one-line metrics summary.

The prompt is a user turn in the tokenizer's chat template when it has one (an instruct model given bare text mostly
ends its turn at once: blank output); `--raw` feeds the text as is, for a plain continuation.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from ar2dlm.engine import DecodeParams, Engine, GenerationResult, encode_prompt
from ar2dlm.engine.params import add_decode_args, decode_params_from_args, for_model, policy_was_given
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.open import MODEL_SPEC_HELP, open_for_decoding
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
from ar2dlm.utils.files import check_output_file, write_json


@dataclass(kw_only=True)
class GenerateConfig:
    model: str = field(metadata={"help": MODEL_SPEC_HELP})
    prompt: str = field(metadata={"help": "prompt text"})
    chat: bool = field(default=False, metadata={
        "help": "wrap the prompt as a user turn with the chat template (done anyway when the tokenizer has one; "
                "--chat makes a tokenizer without one an error)"})
    raw: bool = field(default=False, metadata={"help": "plain continuation: the prompt as is, no chat template"})
    stream: bool = field(default=False, metadata={"help": "print the text as it is decoded"})
    json_out: str | None = field(default=None, metadata={"help": "also write text and metrics here"})
    decode: DecodeParams = field(default_factory=DecodeParams, metadata={"cli": False})
    policy_given: bool = field(default=True, metadata={"cli": False})  # False: the model's default policy

    def __post_init__(self):
        if self.chat and self.raw:
            raise Ar2dlmError("--chat and --raw exclude each other (a chat turn, or the text as is)")
        check_output_file(self.json_out, "--json-out")  # before the model loads, not after the answer

    def use_chat_template(self, tokenizer) -> bool:
        """--raw: never; --chat: always; by default when the tokenizer has a template."""
        return not self.raw and (self.chat or bool(getattr(tokenizer, "chat_template", None)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, GenerateConfig)
    add_decode_args(parser, defaults={"policy": None})


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    given = policy_was_given(args)
    return dataclass_from_args(GenerateConfig, args, decode=decode_params_from_args(args), policy_given=given)


def run(cfg: GenerateConfig) -> GenerationResult:
    dlm, tokenizer, _ = open_for_decoding(cfg.model)
    engine = Engine(dlm, tokenizer)
    params = for_model(cfg.decode, dlm, cfg.policy_given)
    ids = encode_prompt(tokenizer, cfg.prompt, chat=cfg.use_chat_template(tokenizer))
    if cfg.stream:
        stream = engine.stream(ids, params)
        for delta in stream:
            print(delta, end="", flush=True)
        print()
        result = stream.result
    else:
        result = engine.generate(ids, params)
        print(result.text)
    print(f"[policy {params.label} | {result.summary()}]", file=sys.stderr)
    if cfg.json_out:
        write_json(cfg.json_out, {"prompt": cfg.prompt, "text": result.text, "tokens": len(result.tokens),
                                  "nfe": result.nfe, "tpf": result.tpf, "tokens_per_s": result.tokens_per_s,
                                  "ttft_s": result.ttft_s, "stop_reason": result.stop_reason})
    return result
