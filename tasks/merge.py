"""Stage `merge`: the Param-Merge baselines (MOPD 4.1, M2RL): mergekit merges of the teachers
with base = the SFT checkpoint, one output directory per method."""

from __future__ import annotations

from mopd.artifacts import Result
from mopd.merging import merge, method_params
from mopd.settings.merge import MergeParams
from mopd.stage import StageContext


def run(ctx: StageContext) -> Result:
    """One merged checkpoint per configured method under <out_dir>/<method>/."""
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    p: MergeParams = cfg.params.merge
    # Only checkpoints can be merged: domains routed to remote endpoints take no part.
    teachers = [path / "model" for path in ctx.roles_of("teachers").values()]
    for method in p.methods:
        merge(method, base=ctx.role("base") / "model", models=teachers, out_dir=out_dir / method,
              params=method_params(method, task_arithmetic_lambda=p.task_arithmetic_lambda,
                                   density=p.density, seed=cfg.params.seed),
              paths_from=cfg.project_dir)
    metrics = {"n_merges": len(p.methods)}
    tracker.log_metrics(metrics)
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("merge", run))
