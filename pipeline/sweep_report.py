"""What a finished sweep reports: the Pareto front, the selected trial, the summary CSV and the plots.

Pure functions of the per-trial rows :mod:`pipeline.sweep` collects (one dict per trial: ``trial_id``,
``status``, the sampled values under ``config``, the best epoch's selection metric -- ``val_accuracy``
for VQA students, ``val_cider_d`` for captioners, or the job's ``selection_metric`` -- ``params``,
``latency_ms_per_example``, ``checkpoint``, ...), so selection is testable without Ray. Every function
that ranks takes the ``metric`` (higher is better; default ``val_accuracy``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from pipeline import names

COMPLETED, STOPPED_EARLY, FAILED = "completed", "stopped_early", "failed"
NOT_STARTED, UNFINISHED = "not_started", "unfinished"  # time budget reached first; driver interrupted


def _scored(row: dict, metric: str = names.VAL_ACCURACY) -> bool:
    return row["status"] in (COMPLETED, STOPPED_EARLY) and row.get(metric) is not None


def _measured(row: dict, metric: str = names.VAL_ACCURACY) -> bool:
    return _scored(row, metric) and row.get(names.PARAMS) is not None and row.get(names.LATENCY_MS) is not None


def pareto_front(rows: list[dict], metric: str = names.VAL_ACCURACY) -> set[str]:
    """Trial ids no other trial beats: a higher-or-equal ``metric`` with fewer-or-equal parameters and
    latency, strictly better in one of the three."""
    points = [(r["trial_id"], r[metric], r[names.PARAMS], r[names.LATENCY_MS]) for r in rows if _measured(r, metric)]
    front = set()
    for tid, acc, params, latency in points:
        dominated = any(
            a >= acc and p <= params and lat <= latency and (a > acc or p < params or lat < latency)
            for other, a, p, lat in points
            if other != tid
        )
        if not dominated:
            front.add(tid)
    return front


def within_budget(row: dict, max_params: int | None, max_latency_ms: float | None) -> bool:
    if max_params is not None and (row.get(names.PARAMS) is None or row[names.PARAMS] > max_params):
        return False
    if max_latency_ms is not None and (row.get(names.LATENCY_MS) is None or row[names.LATENCY_MS] > max_latency_ms):
        return False
    return True


def select_best(rows: list[dict], max_params: int | None = None, max_latency_ms: float | None = None,
                metric: str = names.VAL_ACCURACY) -> dict | None:
    """The trial with the best ``metric`` among those that reported one and fit the budgets.

    Ties go to the smaller model (fewer parameters, then lower latency), then to the lower
    validation loss, then to the trial id (so the choice never depends on row order). None when no
    trial qualifies.
    """
    eligible = [r for r in rows if _scored(r, metric) and within_budget(r, max_params, max_latency_ms)]
    if not eligible:
        return None

    def key(row: dict):
        return (
            -row[metric],
            row.get(names.PARAMS) if row.get(names.PARAMS) is not None else math.inf,
            row.get(names.LATENCY_MS) if row.get(names.LATENCY_MS) is not None else math.inf,
            row.get(names.VAL_LOSS) if row.get(names.VAL_LOSS) is not None else math.inf,
            row["trial_id"],
        )

    return min(eligible, key=key)


CSV_COLUMNS = (
    "trial_id", "status", "epochs", names.VAL_ACCURACY, names.VAL_LOSS, "best_epoch", names.PARAMS,
    names.LATENCY_MS, "pareto", "within_budget", "selected", "checkpoint", "run_id", "error",
)


def write_csv(rows: list[dict], space_keys: list[str], path: Path, metric: str = names.VAL_ACCURACY) -> None:
    """One line per trial: id, outcome, the sampled values, the best epoch's figures (``metric`` in the
    place of ``val_accuracy``) and the flags."""
    figures = tuple(metric if column == names.VAL_ACCURACY else column for column in CSV_COLUMNS)
    columns = list(figures[:3]) + list(space_keys) + list(figures[3:])
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            line = {key: row.get(key) for key in figures}
            line.update({key: row["config"].get(key) for key in space_keys})
            line["error"] = (row.get("error") or "").splitlines()[0][:200] if row.get("error") else ""
            writer.writerow(line)


def plot(rows: list[dict], directory: Path, shapes: dict[str, dict], metric: str = names.VAL_ACCURACY) -> list[Path]:
    """Two PNGs: the validation ``metric`` against student heads and layers; against parameters and
    measured latency with the Pareto front marked. ``shapes``: trial id -> {"heads", "layers"}.

    matplotlib comes with MLflow; without it no plots are written (the CSV still is).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a cluster node
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    scored = [r for r in rows if _scored(r, metric)]
    written = []
    ylabel = {names.VAL_ACCURACY: "validation accuracy", names.VAL_CIDER_D: "validation CIDEr-D"}.get(metric, metric)

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for axis, key in zip(axes, ("heads", "layers")):
        for status, marker in ((COMPLETED, "o"), (STOPPED_EARLY, "x")):
            points = [(shapes[r["trial_id"]][key], r[metric]) for r in scored if r["status"] == status]
            if points:
                axis.scatter(*zip(*points), marker=marker, label=status.replace("_", " "))
        axis.set_xlabel(f"student {key}")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"{ylabel} (best epoch)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="small")
    figure.tight_layout()
    written.append(directory / "accuracy_vs_heads_layers.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)

    measured = [r for r in scored if _measured(r, metric)]
    front = pareto_front(rows, metric)
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for axis, key, label in ((axes[0], names.PARAMS, "student parameters"), (axes[1], names.LATENCY_MS, "CPU latency per example (ms)")):
        axis.scatter([r[key] for r in measured], [r[metric] for r in measured], color="grey", label="trial")
        on_front = sorted((r[key], r[metric]) for r in measured if r["trial_id"] in front)
        if on_front:
            axis.plot(*zip(*on_front), "o-", color="tab:red", label="Pareto front")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"{ylabel} (best epoch)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="small")
    figure.tight_layout()
    written.append(directory / "pareto.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)
    return written
