"""Put a finished `ar2dlm convert --drafter` run (gated or feature drafter) into the package as a shipped dLM (default: smollm2-135m-dlm).

    python scripts/ship_drafter.py RUN_FOLDER [--name smollm2-135m-dlm] [--dest ar2dlm/drafters] [--plot-out PNG]

Writes `<dest>/<name>/`: the adapter in half precision (`drafter.safetensors`, half the float32 file; it loads back
into the model's dtype), `dlm_config.json`, the tokenizer, and `training.json`: the command that trained it (rebuilt
from the run's config.json, data given by file name), the training tokens and the held-out acceptance curve from
metrics.jsonl (draft accuracy at +1/+2/+3 and tokens per verify step at every evaluation), and for a run that
continued a drafter (`--init-drafter`) that drafter's own record under `started_from` (read before the folder is
replaced, so a shipped drafter can be trained further and shipped again under its name). Refuses a run that is
not a finished drafter run, and a result over the size limit. The folder is replaced atomically. --plot-out also
draws the acceptance curve (tokens per verify step and draft accuracy against training tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZE_LIMIT = 20 * 2 ** 20
SKIPPED = {"output", "resume", "device", "keep_checkpoint", "feature_cache"}  # where and how it ran, not what
FEATURE_ONLY_SKIPPED = {"drafter", "lora_rank", "lora_alpha"}  # implied by, or unused with, --drafter-kind feature


def convert_command(config: dict) -> str:
    """`ar2dlm convert ...` with every setting that differs from its default."""
    from ar2dlm.training.config import ConvertConfig

    parts = ["ar2dlm convert"]
    skipped = SKIPPED | (FEATURE_ONLY_SKIPPED if config.get("drafter_kind") == "feature" else set())
    for f in dataclasses.fields(ConvertConfig):
        if f.name in skipped or f.name not in config:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        value = config[f.name]
        if value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            parts.append(f"{flag} {Path(value).name if f.name == 'data' else value}")
    return " ".join(parts)


def acceptance_curve(metrics_path: Path) -> list[dict]:
    """Held-out draft statistics at every evaluation, with the training tokens seen by then."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    tokens = {r["step"]: r["tokens"] for r in rows if "tokens" in r}
    curve = []
    for r in rows:
        if "heldout_draft_accepted" not in r:
            continue
        accs = [round(r[f"heldout_draft_acc_{k}"], 4) for k in range(1, 9) if f"heldout_draft_acc_{k}" in r]
        curve.append({"step": r["step"], "training_tokens": tokens.get(r["step"], 0), "draft_acc": accs,
                      "tokens_per_verify_step": round(1 + r["heldout_draft_accepted"], 4),
                      "anchors": r.get("heldout_draft_anchors")})
    return curve


def started_from(config: dict) -> dict | None:
    """The record of the drafter a continued run started from (`--init-drafter`), or None for a fresh run."""
    from ar2dlm.model.loading import resolve_dlm_path

    init = config.get("init_drafter")
    if not init:
        return None
    path = resolve_dlm_path(init) / "training.json"
    prior = json.loads(path.read_text()) if path.is_file() else {}
    return {"drafter": init, **prior}


def plot_curve(curve: list[dict], title: str, path: Path) -> None:
    from matplotlib.figure import Figure

    from ar2dlm.utils.files import save_figure

    tokens = [p["training_tokens"] / 1000 for p in curve]
    fig = Figure(figsize=(9, 3.6))
    left, right = fig.subplots(1, 2)
    left.plot(tokens, [p["tokens_per_verify_step"] for p in curve], marker="o")
    left.set(xlabel="training tokens (thousands)", ylabel="tokens per verify step", title="acceptance")
    for k in range(len(curve[0]["draft_acc"])):
        right.plot(tokens, [100 * p["draft_acc"][k] for p in curve], marker="o", label=f"draft +{k + 1}")
    right.set(xlabel="training tokens (thousands)", ylabel="held-out accuracy (%)", title="drafts")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path)


def ship(run: Path, name: str, dest: Path) -> Path:
    import torch

    from ar2dlm.drafter.feature import FeatureDrafterLM
    from ar2dlm.drafter.gated import GatedDrafterLM
    from ar2dlm.errors import Ar2dlmError
    from ar2dlm.model.open import load_dlm
    from ar2dlm.utils.files import atomic_dir

    config = json.loads((run / "config.json").read_text())
    if not config.get("drafter") or not (run / "summary.json").is_file():
        raise Ar2dlmError(f"{run} is not a finished drafter run (config.json with drafter: true, summary.json)")
    model, tokenizer = load_dlm(run / "model")
    if not isinstance(model, (GatedDrafterLM, FeatureDrafterLM)):
        raise Ar2dlmError(f"{run / 'model'} is not a drafter (gated or feature)")
    curve = acceptance_curve(run / "metrics.jsonl")
    tokens = curve[-1]["training_tokens"] if curve else 0
    prior = started_from(config)
    record = {"command": convert_command(config), "parent": config["model"], "training_tokens": tokens,
              "total_training_tokens": tokens + ((prior or {}).get("total_training_tokens")
                                                 or (prior or {}).get("training_tokens") or 0),
              "curve": curve, "summary": json.loads((run / "summary.json").read_text()).get("drafter"),
              "started_from": prior}
    folder = dest / name
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, tokenizer, base_model=config["model"], dtype=torch.float16)
        (Path(tmp) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        if size > SIZE_LIMIT:
            raise Ar2dlmError(f"the shipped folder would be {size / 2**20:.1f} MB, over the {SIZE_LIMIT >> 20} MB limit")
    return folder


def main(argv: list[str] | None = None) -> int:
    from ar2dlm.errors import Ar2dlmError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `ar2dlm convert --drafter` output folder")
    parser.add_argument("--name", default="smollm2-135m-dlm", help="the shipped dLM's name")
    parser.add_argument("--dest", type=Path, default=REPO / "ar2dlm" / "drafters", help="where shipped dLMs live")
    parser.add_argument("--plot-out", type=Path, help="also draw the acceptance curve here (PNG)")
    args = parser.parse_args(argv)
    try:
        folder = ship(args.run, args.name, args.dest)
        record = json.loads((folder / "training.json").read_text())
        if args.plot_out and record["curve"]:
            plot_curve(record["curve"], f"{args.name} on {record['parent']}: held-out acceptance", args.plot_out)
    except (Ar2dlmError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2 ** 20
    print(f"shipped {args.run} as {folder} ({size:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
