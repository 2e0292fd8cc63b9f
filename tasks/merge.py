"""Stage `merge`: the Param-Merge baselines (MOPD 4.1, M2RL): mergekit merges of the teachers
with base = the SFT checkpoint, one output directory per method."""

from __future__ import annotations

from typing import TYPE_CHECKING
from pathlib import Path

from mopd.artifacts import Result, finalize
from mopd.merging import merge, method_params

if TYPE_CHECKING:  # the root configuration belongs to the runner (tasks.cli)
    from mopd.config import Config


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker) -> Result:
    """One merged checkpoint per configured method under <out_dir>/<method>/."""
    p = cfg.params.merge
    # Only checkpoints can be merged: domains routed to remote endpoints take no part.
    teachers = [inputs[f"teacher:{d}"] / "model" for d in cfg.local_teacher_domains]
    for method in p.methods:
        merge(method, base=inputs["sft"] / "model", models=teachers, out_dir=out_dir / method,
              params=method_params(method, task_arithmetic_lambda=p.task_arithmetic_lambda,
                                   density=p.density, seed=cfg.params.seed))
    metrics = {"n_merges": len(p.methods)}
    tracker.log_metrics(metrics)
    return finalize("merge", cfg.project_dir, out_dir, metrics)


if __name__ == "__main__":
    from tasks.cli import main

    raise SystemExit(main("merge", run))
