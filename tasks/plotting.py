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


def reward_quarters(history: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """Mean training reward over the first and the last quarter of a GRPO run (empty if none)."""
    rewards = [v for _, v in history.get("train/reward", [])]
    if not rewards:
        return {}
    n = max(1, len(rewards) // 4)
    return {"reward_first_quarter": sum(rewards[:n]) / n, "reward_last_quarter": sum(rewards[-n:]) / n}
