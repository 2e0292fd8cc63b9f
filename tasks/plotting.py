"""Training-curve figures for a stage's MLflow run (stage-level glue over mopd.plots)."""

from __future__ import annotations


def log_curves(tracker, history: dict[str, list[tuple[int, float]]], title: str) -> None:
    """Log loss/reward curves (raw + smoothed) as a PNG on the stage's run, if there are any."""
    keep = {k: v for k, v in history.items()
            if any(w in k for w in ("loss", "reward", "kl", "advantage", "entropy")) and len(v) > 1}
    if not keep:
        return
    from mopd.plots import training_curves

    fig = training_curves(keep, title)
    tracker.log_figure(fig, "training_curves.png")
