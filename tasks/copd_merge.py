"""Stage `copd_merge`: CoPD's final model (ALGORITHMS §6; Algorithm 1 line 17): the co-evolved
branches of the last cycle merged through mergekit, base = the SFT checkpoint (linear by
default, any mergekit method of `copd.merge_method`). Its table label is `copd`."""

from __future__ import annotations

from typing import TYPE_CHECKING
from pathlib import Path

from mopd.artifacts import Result, finalize
from mopd.merging import merge, method_params

if TYPE_CHECKING:  # the root configuration belongs to the runner (tasks.cli)
    from mopd.config import Config


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker) -> Result:
    c = cfg.params.copd
    branches = [inputs[f"copd:{c.cycles}:opd:{d}"] / "model" for d in cfg.copd_branches]
    params = method_params(c.merge_method, task_arithmetic_lambda=c.task_arithmetic_lambda, density=c.density,
                           seed=cfg.params.seed)
    merge(c.merge_method, base=inputs["sft"] / "model", models=branches, out_dir=out_dir / "model",
          params=params, overwrite=True)
    tracker.log_params({"copd/merge_method": c.merge_method, "copd/branches": ",".join(cfg.copd_branches)})
    return finalize("copd_merge", cfg.project_dir, out_dir, {"n_branches": float(len(branches))})


if __name__ == "__main__":
    from tasks.cli import main

    raise SystemExit(main("copd_merge", run))
