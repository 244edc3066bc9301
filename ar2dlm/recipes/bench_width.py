"""`ar2dlm bench-width`: what one engine forward costs at each width (positions fed), on this machine.

The figure to read before choosing a draft length or a block size: a forward of `w` positions pays off only when it
commits more than cost(w) / cost(1) tokens. Prints the curve (ms, x width 1, positions/s), optionally writes it as
JSON and a plot. `--linear-kernels onednn,default` measures the curve once per kernel of the linear layers (oneDNN
with packed weights, the engine's default on a CPU, against torch's default MKL path), and `--decoders fused,hf` once
per decoder forward (the engine's fused one against Hugging Face's modules), every combination in the same run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.open import MODEL_SPEC_HELP
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args
from ar2dlm.utils.files import check_output_file, write_json

DECODERS = ("fused", "hf")


@dataclass
class WidthBenchConfig:
    model: str = field(metadata={"help": MODEL_SPEC_HELP})
    widths: str = field(default="1,2,4,8,16,32", metadata={"help": "comma-separated forward widths"})
    context: int = field(default=200, metadata={"help": "cached positions before the measured forward"})
    linear_kernels: str = field(default="auto", metadata={
        "help": "comma-separated kernels for the linear layers, one curve each: auto (the engine's choice), onednn "
                "(packed weights), default (torch's own)"})
    decoders: str = field(default="fused", metadata={
        "help": "comma-separated decoder forwards, one curve each: fused (the engine's, for Llama-family models) "
                "or hf (Hugging Face's modules)"})
    repeats: int = field(default=7, metadata={"help": "timed forwards per width (the median is reported)"})
    device: str = field(default="auto", metadata={"help": "device", "choices": ["auto", "cpu", "cuda"]})
    json_out: str | None = field(default=None, metadata={"help": "write the curve here"})
    plot_out: str | None = field(default=None, metadata={"help": "plot the curve here (PNG)"})

    def __post_init__(self):
        self.width_list()
        self.kernel_list()
        self.decoder_list()
        if self.context < 1 or self.repeats < 1:
            raise Ar2dlmError("--context and --repeats must be >= 1")
        check_output_file(self.json_out, "--json-out")
        check_output_file(self.plot_out, "--plot-out")

    def width_list(self) -> list[int]:
        try:
            widths = [int(w) for w in self.widths.split(",") if w.strip()]
        except ValueError:
            raise Ar2dlmError(f"--widths must be comma-separated integers, got {self.widths!r}") from None
        if not widths or any(w < 1 for w in widths):
            raise Ar2dlmError(f"--widths must be integers >= 1, got {self.widths!r}")
        return sorted(set(widths))

    def kernel_list(self) -> list[str]:
        from ar2dlm.model.packed_linear import KERNELS

        return _choices(self.linear_kernels, KERNELS, "--linear-kernels")

    def decoder_list(self) -> list[str]:
        return _choices(self.decoders, DECODERS, "--decoders")


def _choices(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    """The distinct entries of a comma-separated option, in order; each must be one of `allowed`."""
    picked = [t.strip() for t in text.split(",") if t.strip()]
    if not picked or any(t not in allowed for t in picked):
        raise Ar2dlmError(f"{option} must be a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return list(dict.fromkeys(picked))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, WidthBenchConfig)


def config_from_args(args: argparse.Namespace) -> WidthBenchConfig:
    return dataclass_from_args(WidthBenchConfig, args)


def run(cfg: WidthBenchConfig) -> dict:
    import torch

    from ar2dlm.engine.cost import forward_cost
    from ar2dlm.model.fused_decoder import unfusable_reason
    from ar2dlm.model.open import context_length, open_for_decoding
    from ar2dlm.model.packed_linear import resolve_kernel
    from ar2dlm.utils.devices import resolve_device

    device = resolve_device(cfg.device)
    dlm, _, _ = open_for_decoding(cfg.model, device=device)
    limit = context_length(dlm)
    if limit is not None and cfg.context + max(cfg.width_list()) > limit:
        raise Ar2dlmError(f"--context + the widest forward exceed the model's context window ({limit})")
    kernels = list(dict.fromkeys(resolve_kernel(k, dlm) for k in cfg.kernel_list()))
    if "fused" in cfg.decoder_list() and unfusable_reason(dlm) is not None:
        print(f"note: {cfg.model} runs Hugging Face's decoder forward ({unfusable_reason(dlm)} has no fused one)")
    curves = {}
    for kernel in kernels:
        for decoder in cfg.decoder_list():
            costs = forward_cost(dlm, cfg.width_list(), cfg.context, cfg.repeats, linear_kernel=kernel,
                                 fused=decoder == "fused")
            one = costs[min(costs)]
            curves[f"{kernel} + {decoder}"] = [{"width": w, "ms": c * 1000, "x_width_1": c / one,
                                                "positions_per_s": w / c} for w, c in costs.items()]
    result = {"model": cfg.model, "device": str(device), "threads": torch.get_num_threads(), "context": cfg.context,
              "curve": next(iter(curves.values())), "curves": curves}
    print(f"{cfg.model} on {device}, {torch.get_num_threads()} thread(s), {cfg.context} cached positions; "
          "curves: linear kernel + decoder forward")
    print(f"{'':>6}" + "".join(f"{k:>30}" for k in curves))
    print(f"{'width':>6}" + f"{'ms':>9}{'x w=1':>8}{'positions/s':>13}" * len(curves))
    for i, width in enumerate(cfg.width_list()):
        print(f"{width:>6}" + "".join(f"{c[i]['ms']:>9.1f}{c[i]['x_width_1']:>8.2f}{c[i]['positions_per_s']:>13.0f}"
                                      for c in curves.values()))
    if cfg.json_out:
        write_json(cfg.json_out, result)
    if cfg.plot_out:
        plot_curve(result, cfg.plot_out)
    return result


def plot_curve(result: dict, path: str) -> None:
    from matplotlib.figure import Figure

    from ar2dlm.utils.files import save_figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    widths = [p["width"] for p in result["curve"]]
    for label, curve in result["curves"].items():
        ax.plot(widths, [p["ms"] for p in curve], marker="o", label=f"{label} (linear kernel + decoder forward)")
    ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel("positions fed in one forward (width)")
    ax.set_ylabel("ms per forward")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"{result['model']}: {result['device']}, {result['threads']} thread(s), "
                 f"{result['context']} cached positions", fontsize=9)
    save_figure(fig, path)
