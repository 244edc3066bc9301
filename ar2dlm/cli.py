"""The `ar2dlm` command line: one subcommand per job. User errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ar2dlm import __version__
from ar2dlm.errors import Ar2dlmError
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args


def _cmd_convert(args) -> int:
    from ar2dlm.training.config import ConvertConfig
    from ar2dlm.training.convert import convert

    summary = convert(dataclass_from_args(ConvertConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2))
        for s in summary.get("samples", []):
            print(f"[guess|truth] {s['correct']}/{s['masked']} correct: {s['text']!r}")
    return 0


def _cmd_distill(args) -> int:
    from ar2dlm.distillation.distill import DistillConfig, distill

    summary = distill(dataclass_from_args(DistillConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_bench_train(args) -> int:
    from ar2dlm.bench.train_throughput import BenchConfig, run_benchmark

    run_benchmark(dataclass_from_args(BenchConfig, args))
    return 0


def _cmd_bench(args) -> int:
    from ar2dlm.bench.decode_speed import DecodeBenchConfig, run_decode_bench

    cfg = dataclass_from_args(DecodeBenchConfig, args)
    run_decode_bench(cfg)
    written = [p for p in (cfg.json_out, cfg.plot_out) if p]
    if written:
        print(f"wrote {' and '.join(written)}", file=sys.stderr)
    return 0


def _quiet_libraries() -> None:
    """Our own progress bars and one-line errors are the interface; silence the libraries' chatter."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _cmd_compare(args) -> int:
    from ar2dlm.decoding.compare import CompareConfig, run_compare

    run_compare(dataclass_from_args(CompareConfig, args))
    return 0


def _cmd_generate(args) -> int:
    from ar2dlm.decoding.generate import GenerateConfig, run_generate

    run_generate(dataclass_from_args(GenerateConfig, args))
    return 0


def _cmd_chat(args) -> int:
    from ar2dlm.decoding.chat import ChatConfig, run_chat

    return run_chat(dataclass_from_args(ChatConfig, args))


def _cmd_eval(args) -> int:
    from ar2dlm.evaluation.report import render_markdown
    from ar2dlm.evaluation.runner import EvalConfig, run_eval

    cfg = dataclass_from_args(EvalConfig, args)
    results = run_eval(cfg)
    sys.stdout.write(render_markdown([results]))
    print(f"wrote {cfg.output} and {cfg.plot_path}", file=sys.stderr)
    return 0


def _cmd_ppl(args) -> int:
    from ar2dlm.evaluation.likelihood import PplConfig, run_ppl, summary_lines

    cfg = dataclass_from_args(PplConfig, args)
    results = run_ppl(cfg)
    print("\n".join(summary_lines(results)))
    print(f"wrote {cfg.output}", file=sys.stderr)
    return 0


def _cmd_lm_eval(args) -> int:
    from ar2dlm.evaluation.lm_eval_adapter import run_cli

    return run_cli(args.lm_eval_args)


def _cmd_report(args) -> int:
    from ar2dlm.evaluation.report import ReportConfig, run_report

    run_report(dataclass_from_args(ReportConfig, args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ar2dlm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ar2dlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    from ar2dlm.training.config import ConvertConfig

    p = sub.add_parser("convert", help="convert an AR model into a block-diffusion LM (continuous pretraining)")
    add_dataclass_args(p, ConvertConfig)
    p.set_defaults(func=_cmd_convert)

    from ar2dlm.distillation.distill import DistillConfig

    p = sub.add_parser("distill", help="pseudo-trajectory distillation (d3LLM): more tokens per forward")
    add_dataclass_args(p, DistillConfig)
    p.set_defaults(func=_cmd_distill)

    from ar2dlm.bench.train_throughput import BenchConfig

    p = sub.add_parser("bench-train", help="training throughput: dLM loss vs plain AR fine-tuning, side by side")
    add_dataclass_args(p, BenchConfig)
    p.set_defaults(func=_cmd_bench_train)

    from ar2dlm.bench.decode_speed import DecodeBenchConfig

    p = sub.add_parser("bench", help="decoding speed: dLM policies vs HF generate and our ar on the AR parent "
                                     "(tokens/s, NFE, TPF, agreement) at several batch sizes")
    add_dataclass_args(p, DecodeBenchConfig)
    p.set_defaults(func=_cmd_bench)

    from ar2dlm.decoding.compare import CompareConfig

    p = sub.add_parser("compare", help="AR parent and dLM answer the same prompts side by side (TPF, agreement)")
    add_dataclass_args(p, CompareConfig)
    p.set_defaults(func=_cmd_compare)

    from ar2dlm.decoding.generate import GenerateConfig

    p = sub.add_parser("generate", help="answer a prompt with the cached decoding engine (text + NFE/TPF/speed)")
    add_dataclass_args(p, GenerateConfig)
    p.set_defaults(func=_cmd_generate)

    from ar2dlm.decoding.chat import ChatConfig

    p = sub.add_parser("chat", help="interactive multi-turn chat with streaming and per-answer NFE/TPF/speed "
                                    "(/reset, /quit)")
    add_dataclass_args(p, ChatConfig)
    p.set_defaults(func=_cmd_chat)

    from ar2dlm.evaluation.runner import EvalConfig

    p = sub.add_parser("eval", help="accuracy (or fidelity to the AR parent) vs TPF and speed over a decode sweep")
    add_dataclass_args(p, EvalConfig)
    p.set_defaults(func=_cmd_eval)

    from ar2dlm.evaluation.likelihood import PplConfig

    p = sub.add_parser("ppl", help="held-out perplexity of the AR parent and the dLM's block-diffusion bound on it")
    add_dataclass_args(p, PplConfig)
    p.set_defaults(func=_cmd_ppl)

    # Every argument after `lm-eval` goes to lm_eval's own command line (main() passes the unparsed rest).
    p = sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness with the `ar2dlm` model registered "
                                                      "(lm_eval's arguments; --model ar2dlm by default)")
    p.set_defaults(func=_cmd_lm_eval)

    from ar2dlm.evaluation.report import ReportConfig

    p = sub.add_parser("report", help="markdown table and combined plot from `eval` results files")
    p.add_argument("results", nargs="+", metavar="RESULTS.json", help="results files written by `ar2dlm eval`")
    add_dataclass_args(p, ReportConfig, skip=("results",))
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "lm-eval":
        args.lm_eval_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        return args.func(args)
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
