"""`ar2dlm convert`: continuous pretraining that turns a causal LM into a block-diffusion LM (Efficient-DLM recipe)."""

from __future__ import annotations

import argparse
import json
import os

from ar2dlm.training.config import ConvertConfig
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, ConvertConfig)


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    return dataclass_from_args(ConvertConfig, args)


def run(cfg: ConvertConfig) -> dict:
    from ar2dlm.training.convert import convert

    summary = convert(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
        for s in summary.get("samples", []):
            print(f"[guess|truth] {s['correct']}/{s['masked']} correct: {s['text']!r}")
    return summary
