"""A finished training run's summary (`summary.json` of `convert` or `distill`) in a few plain lines: what was trained,
how long, what bounded it, and what it learned on held-out data. The JSON keeps every number; this is what people read.

    python -m ar2dlm.training.summary runs/smollm2-135m-convert   # what scripts/main.sh prints for a finished run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SUMMARY_FILE = "summary.json"  # written last: a run folder holding it is a finished run


def _kind(summary: dict) -> str:
    """What the run produced: a dLM of some block size, a distilled dLM, or a gated drafter."""
    if "trajectories" in summary:  # only distill records its trajectories
        return f"distilled dLM (block {' -> '.join(map(str, summary.get('block_sizes') or []))})"
    if summary.get("drafter", {}).get("kind") == "feature":
        d = summary["drafter"]
        return (f"feature drafter ({d.get('num_layers')} layers on parent layers {d.get('feature_layers')}, "
                f"block {summary.get('dlm', {}).get('block_size')})")
    if summary.get("drafter"):
        return f"gated drafter (LoRA rank {summary['drafter'].get('lora_rank')})"
    block = (summary.get("dlm") or {}).get("block_size")
    return f"dLM (block {block})" if block else "dLM"


def _tokens(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _training_line(summary: dict) -> str:
    bound = "stopped by the --max-minutes budget" if summary.get("stopped_early") else "--max-steps reached"
    return (f"{summary.get('model')} -> {_kind(summary)}: {summary.get('steps')} steps, "
            f"{_tokens(summary.get('tokens') or 0)} tokens, {(summary.get('train_seconds') or 0) / 60:.1f} min of "
            f"training ({bound})")


def _heldout_line(summary: dict) -> str | None:
    before, after = summary.get("heldout_before") or {}, summary.get("heldout_after") or {}
    if "heldout_acc" not in before or "heldout_acc" not in after:
        return None  # no held-out set (--heldout 0)
    what = "trajectory-masked" if "trajectories" in summary else "masked-token"
    line = f"held-out {what} accuracy {before['heldout_acc']:.1%} -> {after['heldout_acc']:.1%}"
    if "heldout_loss" in before and "heldout_loss" in after:
        line += f" (loss {before['heldout_loss']:.2f} -> {after['heldout_loss']:.2f})"
    return line


def _drafter_line(summary: dict) -> str | None:
    drafter = summary.get("drafter")
    if not drafter:
        return None
    before, after = drafter.get("before") or {}, drafter.get("after") or {}
    if after.get("tokens_per_verify_step") is None:
        return None
    accs = after.get("draft_acc") or []
    at = "/".join(f"+{k + 1}" for k in range(len(accs)))
    return (f"tokens per verify step {before.get('tokens_per_verify_step') or 1:.2f} -> "
            f"{after['tokens_per_verify_step']:.2f} (draft accuracy at {at}: "
            f"{' / '.join(f'{a:.0%}' for a in accs)})")


def summary_lines(summary: dict) -> list[str]:
    """The summary in plain lines (no raw floats, no checksums)."""
    lines = [_training_line(summary), _heldout_line(summary), _drafter_line(summary)]
    return [line for line in lines if line] + [f"model: {summary.get('output')}"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ar2dlm.training.summary RUN_FOLDER", file=sys.stderr)
        return 2
    path = Path(argv[0]) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"ar2dlm: error: cannot read {path}: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
