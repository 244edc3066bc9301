"""The `ar2dlm` command line: one subcommand per job. User errors become one line on stderr and exit code 2.

Each command is a recipe module (`ar2dlm/recipes/`), imported only when its command runs: `ar2dlm -h` lists the
commands from the table below without importing any, and `ar2dlm generate ...` imports the generate recipe alone.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ar2dlm import __version__
from ar2dlm.errors import Ar2dlmError

# command -> (recipe module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("ar2dlm.recipes.convert", "convert an AR model into a block-diffusion LM (continuous pretraining)"),
    "distill": ("ar2dlm.recipes.distill", "pseudo-trajectory distillation (d3LLM): more tokens per forward"),
    "bench-train": ("ar2dlm.recipes.bench_train",
                    "training throughput: dLM loss vs plain AR fine-tuning, side by side"),
    "bench": ("ar2dlm.recipes.bench_decode", "decoding speed: dLM policies vs HF generate and our ar on the AR parent "
                                             "(tokens/s, NFE, TPF, agreement) at several batch sizes"),
    "bench-batching": ("ar2dlm.recipes.bench_batching",
                       "continuous batching vs one request at a time on the same arrival trace (throughput, "
                       "latencies, identical outputs)"),
    "bench-width": ("ar2dlm.recipes.bench_width",
                    "the cost of one engine forward at each width (positions fed): read it before picking a draft "
                    "length or block size"),
    "compare": ("ar2dlm.recipes.compare", "AR parent and dLM answer the same prompts side by side (TPF, agreement)"),
    "generate": ("ar2dlm.recipes.generate",
                 "answer a prompt with the cached decoding engine (text + NFE/TPF/speed)"),
    "chat": ("ar2dlm.recipes.chat", "interactive multi-turn chat with streaming and per-answer NFE/TPF/speed "
                                    "(/reset, /quit)"),
    "eval": ("ar2dlm.recipes.eval",
             "accuracy (or fidelity to the AR parent) vs TPF and speed over a decode sweep"),
    "ppl": ("ar2dlm.recipes.ppl", "held-out perplexity of the AR parent and the dLM's block-diffusion bound on it"),
    "lm-eval": ("ar2dlm.recipes.lm_eval", "lm-evaluation-harness with the `ar2dlm` model registered "
                                          "(lm_eval's arguments; --model ar2dlm by default)"),
    "report": ("ar2dlm.recipes.report", "markdown table and combined plot from `eval` results files"),
    "bench-serve": ("ar2dlm.recipes.bench_serve", "load an OpenAI-compatible server: throughput, TTFT and latency "
                                                  "p50/p99, errors at each concurrency"),
    "serve": ("ar2dlm.recipes.serve", "OpenAI-compatible HTTP server with continuous batching, metrics and a live "
                                      "decoding page"),
}


def _named_command(argv: list[str]) -> str | None:
    """The command argv names: its first word that is not an option (the global options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    """The parser with every command listed and only the named one's options built (its recipe imported, and
    returned with the parser; None when argv names no known command)."""
    parser = argparse.ArgumentParser(prog="ar2dlm", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ar2dlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    named, recipe = _named_command(argv), None
    for command, (module, help_text) in COMMANDS.items():
        if command != named:
            sub.add_parser(command, help=help_text)
            continue
        recipe = importlib.import_module(module)
        p = sub.add_parser(command, help=help_text, description=recipe.__doc__.split("\n")[0],
                           add_help=not getattr(recipe, "REST_ARGS", False))
        recipe.add_arguments(p)
    return parser, recipe


def _quiet_libraries() -> None:
    """Our own progress bars and one-line errors are the interface; silence the libraries' chatter."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def parse(argv: list[str]) -> tuple[object, argparse.Namespace]:
    """(recipe module, parsed options) of a command line; argparse's own errors exit 2 with its usage."""
    parser, recipe = build_parser(argv)
    args, rest = parser.parse_known_args(argv)
    if getattr(recipe, "REST_ARGS", False):
        args.rest_args = rest  # lm-eval: everything goes to lm_eval's own command line
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return recipe, args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe, args = parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        result = recipe.run(recipe.config_from_args(args))  # the config checks its values before anything loads
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    except Ar2dlmError as e:
        if args.verbose:
            raise
        print(f"ar2dlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ar2dlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
