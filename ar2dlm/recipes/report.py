"""`ar2dlm report`: a markdown table and a combined accuracy-vs-TPF plot from one or more `ar2dlm eval` results.

    ar2dlm report runs/eval/gsm8k.json runs/eval/fidelity.json --markdown-out table.md --plot-out tpf.png

What the table and the plot hold is `ar2dlm.evaluation.report`'s; every file is read and checked before anything
is printed or written, so a bad file is one error line and no half table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from ar2dlm.errors import Ar2dlmError
from ar2dlm.evaluation.report import load_results, plot_runs, render_markdown
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
from ar2dlm.utils.files import atomic_write, check_output_file


@dataclass
class ReportConfig:
    results: list[str] = field(metadata={"help": "results JSON files written by `ar2dlm eval`"})
    markdown_out: str | None = field(default=None, metadata={"help": "also write the markdown table here"})
    plot_out: str | None = field(default=None, metadata={"help": "write a combined accuracy-vs-TPF plot (PNG) here"})

    def __post_init__(self):
        if not self.results:
            raise Ar2dlmError("report needs at least one results file")
        check_output_file(self.markdown_out, "--markdown-out")
        check_output_file(self.plot_out, "--plot-out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS.json", help="results files written by `ar2dlm eval`")
    add_dataclass_args(parser, ReportConfig, skip=("results",))


def config_from_args(args: argparse.Namespace) -> ReportConfig:
    return dataclass_from_args(ReportConfig, args)


def run(cfg: ReportConfig) -> str:
    runs = [load_results(p) for p in cfg.results]
    text = render_markdown(runs)
    sys.stdout.write(text)
    if cfg.markdown_out:
        with atomic_write(cfg.markdown_out) as f:
            f.write(text)
    if cfg.plot_out:
        plot_runs(runs, cfg.plot_out)
    return text
