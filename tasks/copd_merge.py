"""Stage `copd_merge`: CoPD's final model (ALGORITHMS §6; Algorithm 1 line 17): the co-evolved
branches of the last cycle merged through mergekit, base = the SFT checkpoint (linear by
default, any mergekit method of `copd.merge_method`). Its table label is `copd`."""

from __future__ import annotations

from mopd.artifacts import Result
from mopd.merging import merge, method_params
from mopd.settings.copd import CoPDParams
from mopd.stage import StageContext


def run(ctx: StageContext) -> Result:
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    c: CoPDParams = cfg.params.copd
    branches = [path / "model" for path in ctx.roles_of("branches").values()]  # the last cycle's Phase II
    params = method_params(c.merge_method, task_arithmetic_lambda=c.task_arithmetic_lambda, density=c.density,
                           seed=cfg.params.seed)
    merge(c.merge_method, base=ctx.role("base") / "model", models=branches, out_dir=out_dir / "model",
          params=params, overwrite=True, paths_from=cfg.project_dir)
    tracker.log_params({"copd/merge_method": c.merge_method, "copd/branches": ",".join(cfg.copd_branches)})
    return ctx.result({"n_branches": float(len(branches))})


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("copd_merge", run))
