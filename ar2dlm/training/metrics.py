"""Metrics as JSON lines, and the loss-curve plot made from them."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Append-only jsonl; on resume, lines written after the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            from ar2dlm.utils.files import atomic_write

            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            with atomic_write(self.path) as f:
                f.write("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str = "conversion") -> None:
    """Training loss (and held-out masked-token accuracy when logged) against step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ar2dlm.utils.files import atomic_write

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "heldout_acc" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-token cross-entropy")
    ax.set_title(title)
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [100 * r["heldout_acc"] for r in evals], "o-", color="tab:red",
                 label="held-out masked acc (%)")
        ax2.set_ylabel("held-out masked-token accuracy (%)")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
