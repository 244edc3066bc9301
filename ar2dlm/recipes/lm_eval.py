"""`ar2dlm lm-eval`: lm-evaluation-harness's own command line with the `ar2dlm` model registered.

    ar2dlm lm-eval --model_args pretrained=runs/dlm/model,policy=threshold,tau=0.9 --tasks gsm8k
    python -m ar2dlm.recipes.lm_eval --model_args pretrained=... --tasks ...

Every argument goes to lm_eval unchanged (`--model ar2dlm` is added when no --model is given); the model itself is
the library component `ar2dlm.evaluation.lm_eval_adapter`, which registers itself when imported.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ar2dlm.errors import Ar2dlmError

MODEL_NAME = "ar2dlm"  # the adapter's registered name
REST_ARGS = True  # the CLI hands over the arguments it does not parse (all of them) as `args.rest_args`


@dataclass
class LmEvalConfig:
    args: tuple[str, ...] = field(default=(), metadata={"help": "lm_eval's own command-line arguments"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """None of its own: lm_eval parses them (and answers -h)."""


def config_from_args(args: argparse.Namespace) -> LmEvalConfig:
    return LmEvalConfig(args=tuple(args.rest_args))


def with_model(argv: list[str]) -> list[str]:
    """`--model ar2dlm` added when no --model is given (not to `ls` / `validate`, which take none)."""
    args = list(argv)
    sub = 1 if args and args[0] == "run" else 0
    if (not args or args[0] not in ("ls", "validate")) and not any(a == "--model" or a.startswith("--model=")
                                                                   for a in args):
        args[sub:sub] = ["--model", MODEL_NAME]
    return args


def run(cfg: LmEvalConfig) -> int:
    """lm_eval's command line with `ar2dlm` registered."""
    import ar2dlm.evaluation.lm_eval_adapter  # noqa: F401  (registers the model)
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *with_model(list(cfg.args))]
    try:
        cli_evaluate()
    except ValueError as e:
        # lm_eval checks its arguments (unknown task names, --limit with --samples, a bad config YAML) in its config
        # module with ValueErrors: those are the user's, one line. A ValueError from anywhere else stays a bug.
        if _raised_in_lm_eval_config(e):
            raise Ar2dlmError(str(e).splitlines()[0] if str(e) else "invalid lm_eval arguments") from None
        raise
    finally:
        sys.argv = saved
    return 0


def _raised_in_lm_eval_config(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).parent.parts[-2:] == ("lm_eval", "config")


if __name__ == "__main__":
    try:
        sys.exit(run(LmEvalConfig(args=tuple(sys.argv[1:]))))
    except Ar2dlmError as e:
        print(f"ar2dlm: error: {e}", file=sys.stderr)
        sys.exit(2)
