"""Training-curve figures for a stage's MLflow run (stage-level glue over mopd.plots)."""

from __future__ import annotations

import csv
from pathlib import Path

CURVES_PNG, CURVES_CSV = "training_curves.png", "curves.csv"


def log_curves(tracker, history: dict[str, list[tuple[int, float]]], title: str, out_dir: Path) -> None:
    """Loss/reward curves (raw + smoothed) as ``training_curves.png`` on the stage's run and in
    its output folder, with their points in ``curves.csv`` (step + one column per series): what
    `dvc plots show/diff` draws (dvc.yaml's top-level plots, mopd.dvcgen). Nothing without curves."""
    keep = {k: v for k, v in history.items()
            if any(w in k for w in ("loss", "reward", "kl", "advantage", "entropy")) and len(v) > 1}
    from mopd import runtime

    if not keep or not runtime.is_main():  # (data-parallel: process 0 writes the stage's files)
        return
    from mopd.plots import training_curves

    fig = training_curves(keep, title)
    fig.savefig(Path(out_dir) / CURVES_PNG, dpi=110, bbox_inches="tight")
    tracker.log_figure(fig, CURVES_PNG)
    steps = sorted({s for pts in keep.values() for s, _ in pts})
    by = {k: dict(pts) for k, pts in keep.items()}
    with open(Path(out_dir) / CURVES_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *keep])
        for s in steps:
            w.writerow([s, *(repr(float(by[k][s])) if s in by[k] else "" for k in keep)])


def reward_quarters(history: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """Mean training reward over the first and the last quarter of a GRPO run (empty if none)."""
    rewards = [v for _, v in history.get("train/reward", [])]
    if not rewards:
        return {}
    n = max(1, len(rewards) // 4)
    return {"reward_first_quarter": sum(rewards[:n]) / n, "reward_last_quarter": sum(rewards[-n:]) / n}
