"""Tables and plots of `ar2dlm eval` results: reading a results file, a markdown table, accuracy-vs-TPF plots.

`ar2dlm eval` prints the table of its run and draws its plot; `ar2dlm report` does both for one or more runs. The
table has one row per point (model, task, point, accuracy or agreement, TPF, tokens/s) and the AUP of the run the
point belongs to (over all of that run's points). When several runs share a task, a second table gives their AUP
with one y_max for all (the best accuracy any of them reached), as AUP comparisons between methods require.
The plots are drawn with matplotlib's Agg canvas (no display, no global pyplot state) and written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from ar2dlm.errors import Ar2dlmError

SCHEMA_PREFIX = "ar2dlm.eval/"


def load_results(path: str | Path) -> dict:
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise Ar2dlmError(f"{path}: results file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Ar2dlmError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise Ar2dlmError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith(SCHEMA_PREFIX) \
            or not isinstance(data.get("points"), list) or not data["points"]:
        raise Ar2dlmError(f"{path}: not a results file of `ar2dlm eval`")
    _check_fields(path, data)
    return data


def _check_fields(path: Path, run: dict) -> None:
    """The fields the table and the plots read, so that an edited or truncated file is one error line, not a
    KeyError halfway through the table."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not isinstance(run.get("task"), str) or not number(run.get("aup")) or "model" not in run:
        raise Ar2dlmError(f"{path}: a results file needs 'model', 'task' and a numeric 'aup'")
    for i, p in enumerate(run["points"]):
        if not isinstance(p, dict) or not isinstance(p.get("label"), str) or not isinstance(p.get("kind"), str):
            raise Ar2dlmError(f"{path}: point {i} needs a 'label' and a 'kind'")
        for key in ("accuracy", "tpf", "tokens_per_s"):
            if not number(p.get(key)):
                raise Ar2dlmError(f"{path}: point {i} needs a numeric {key!r}, got {p.get(key)!r}")


def _name(model: str | None) -> str:
    """A model's short name: its folder, with the run folder in front when that is the generic `model/` that
    `convert` and `distill` write (runs/main-A/model -> main-A/model)."""
    path = Path(str(model))
    if path.name == "model" and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or str(model)


def _task(run: dict) -> str:
    return f"fidelity ({run['prompt_task']})" if run.get("prompt_task") else run["task"]


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(runs: list[dict]) -> str:
    from ar2dlm.evaluation.aup import aup_table

    lines = ["| model | task | point | accuracy (%) | TPF | tokens/s | AUP |", "|---|---|---|---:|---:|---:|---:|"]
    for run in runs:
        for p in run["points"]:
            lines.append(f"| {_cell(_name(p.get('model', run['model'])))} | {_cell(_task(run))} | "
                         f"{_cell(p['label'])} | {p['accuracy']:.1f} | {p['tpf']:.2f} | {p['tokens_per_s']:.1f} | "
                         f"{run['aup']:.1f} |")
    notes = ["", "AUP: per run, over all of its points (the AR parent included when it was evaluated)."]
    if any(r["task"] == "fidelity" for r in runs):
        notes.append("Fidelity runs: accuracy = exact-match agreement with the AR parent's greedy answers.")
    by_task: dict[str, list[dict]] = {}
    for run in runs:
        by_task.setdefault(_task(run), []).append(run)
    shared = [(t, rs) for t, rs in by_task.items() if len(rs) > 1]
    if shared:
        notes += ["", "| task | run | AUP (shared y_max) |", "|---|---|---:|"]
        for task, rs in shared:
            names = [f"{i + 1}: {_name(r['model'])}" for i, r in enumerate(rs)]
            table = aup_table({n: [(p["tpf"], p["accuracy"]) for p in r["points"]] for n, r in zip(names, rs)})
            notes += [f"| {_cell(task)} | {_cell(n)} | {v:.1f} |" for n, v in table.items()]
    return "\n".join(lines + notes) + "\n"


# ------------------------------------------------------------------------------------------------------- plots
def _draw(ax, run: dict, x_key: str, name: str) -> None:
    # Joined in TPF order (the curve AUP integrates), in both panels.
    dlm = sorted((p for p in run["points"] if p["kind"] == "dlm"), key=lambda p: (p["tpf"], -p["accuracy"]))
    line, = ax.plot([p[x_key] for p in dlm], [p["accuracy"] for p in dlm], marker="o", label=name)
    sweep = (run.get("sweep") or {}).get("key")
    for p in dlm:
        text = f"{sweep}={p['sweep_value']}" if sweep else p["label"]
        ax.annotate(text, (p[x_key], p["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for p in run["points"]:
        if p["kind"] != "dlm":
            ax.scatter([p[x_key]], [p["accuracy"]], marker="*", s=140, color=line.get_color(), zorder=3,
                       label=f"AR parent {_name(p.get('model'))}")


def _finish(ax, runs: list[dict], x_label: str) -> None:
    fidelity = [r["task"] == "fidelity" for r in runs]
    ax.set_xlabel(x_label)
    ax.set_ylabel("agreement with the AR parent (%)" if all(fidelity) else
                  "accuracy / agreement (%)" if any(fidelity) else "accuracy (%)")
    accs = [p["accuracy"] for r in runs for p in r["points"]]
    lo, hi = min(accs), max(accs)
    pad = max(2.0, 0.1 * (hi - lo))
    ax.set_ylim(max(lo - pad, -1.0), min(hi + pad, 101.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ar2dlm.utils.files import atomic_write

    FigureCanvasAgg(fig)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def plot_run(run: dict, path: str | Path) -> None:
    """One run: accuracy vs TPF and accuracy vs tokens/s, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    name = f"{_name(run['model'])} ({run['task']})"
    for ax, key, label in zip(fig.subplots(1, 2), ("tpf", "tokens_per_s"), ("tokens per forward (TPF)", "tokens/s")):
        _draw(ax, run, key, name)
        _finish(ax, [run], label)
    fig.suptitle(f"{_task(run)}: {run['num_samples']} samples, AUP {run['aup']:.1f}", fontsize=10)
    _save(fig, path)


def plot_runs(runs: list[dict], path: str | Path) -> None:
    """Several runs on one accuracy-vs-TPF plot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for i, run in enumerate(runs):
        _draw(ax, run, "tpf", f"{i + 1}: {_name(run['model'])} / {_task(run)} (AUP {run['aup']:.1f})")
    _finish(ax, runs, "tokens per forward (TPF)")
    _save(fig, path)
