"""Stage `weight_shift`: the weight-shift analysis of "To Mix or To Merge" (M2RL 3.3, ALGORITHMS
§7): which weights each RL teacher changed against the SFT checkpoint (|Δw| > η·max(|w|)), and,
for every pair of teachers and every parameter group, the Jaccard overlap of those changed-masks
beside the random-mask reference (the overlap of independent masks with the same change rates).
An overlap near the reference means the domains moved disjoint, unrelated weights (merging
interferes little); far above it, they compete for the same ones. CSV + PNG, logged to MLflow."""

from __future__ import annotations

from mopd.artifacts import Result
from mopd.metrics import weight_shift_pairs
from mopd.plots import weight_shift_chart
from mopd.settings.analysis import WeightShiftParams
from mopd.stage import StageContext


def run(ctx: StageContext) -> Result:
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    teachers = {f"teacher:{d}": path / "model" for d, path in ctx.roles_of("teachers").items()}
    if len(teachers) < 2:
        raise ValueError(f"weight_shift compares teachers pairwise: pipeline {cfg.pipeline!r} trains "
                         f"{len(teachers)} ({sorted(teachers)})")
    section: WeightShiftParams = cfg.params.weight_shift
    eta = section.eta
    table = weight_shift_pairs(ctx.role("base") / "model", teachers, eta=eta)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "pairs.csv", index=False)
    fig = weight_shift_chart(table, f"Weight shift against SFT (η = {eta:g}): Jaccard vs random reference")
    fig.savefig(out_dir / "jaccard.png", dpi=120)
    tracker.log_figure(fig, "jaccard.png")
    tracker.log_artifact(out_dir / "pairs.csv")
    whole = table[table["group"] == "all"]
    metrics = {}
    for _, r in whole.iterrows():
        pair = f"{r['a'].split(':')[-1]}_{r['b'].split(':')[-1]}"
        metrics |= {f"jaccard/{pair}": float(r["jaccard"]), f"random_reference/{pair}": float(r["random_reference"])}
    for name in teachers:  # each teacher's overall change rate (from any pair it is in)
        row = whole[(whole["a"] == name) | (whole["b"] == name)].iloc[0]
        metrics[f"change_rate/{name.split(':')[-1]}"] = float(row["rate_a"] if row["a"] == name else row["rate_b"])
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("weight_shift", run))
