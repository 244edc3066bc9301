"""`ar2dlm distill`: pseudo-trajectory distillation (d3LLM) of a converted dLM, so it commits more tokens a forward."""

from __future__ import annotations

import argparse
import json
import os

from ar2dlm.distillation.distill import DistillConfig
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, DistillConfig)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    return dataclass_from_args(DistillConfig, args)


def run(cfg: DistillConfig) -> dict:
    from ar2dlm.distillation.distill import distill

    summary = distill(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return summary
