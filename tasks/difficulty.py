"""Stage `difficulty`: Uni-OPD A.1 offline difficulty of the training prompts under the SFT
student, and the balanced (upsampled) prompt set the distillation stage trains on."""

from __future__ import annotations

import json
import random

import pandas as pd

from mopd.artifacts import Result
from mopd.data import BALANCED_FILE, read_split
from mopd.difficulty import balance_all, pass_counts
from mopd.progress import report
from mopd.stage import StageContext


def run(ctx: StageContext) -> Result:
    """Per domain: pass counts of N student samples, histogram before/after, balanced prompts."""
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    from mopd.plots import difficulty_histogram

    p = cfg.params.difficulty
    metrics: dict[str, float] = {}
    for n_done, d in enumerate(cfg.domains):
        report(n_done, len(cfg.domains), "domains", force=True)
        records = read_split(ctx.role("data"), d, "train")
        # Score a random subset to estimate the histogram; hand on every prompt (never drop).
        scored = sorted(random.Random(cfg.params.seed).sample(range(len(records)),
                                                              min(p.max_prompts, len(records))))
        counts = pass_counts(ctx.role("student") / "model", [records[i] for i in scored],
                             cfg.domain(d).verifier, p, cfg.params.seed, ctx.prompt_format)
        balanced, plan, counts_info = balance_all(records, scored, counts, p, cfg.params.seed)
        (out_dir / d).mkdir(parents=True)
        pd.DataFrame(balanced).astype({"pass_count": "int64"}).to_parquet(out_dir / d / BALANCED_FILE, index=False)
        stats = {"shape": plan.shape, "bins": list(plan.bins), "target": plan.target,
                 "hist_before": plan.hist_before.tolist(), "hist_after": plan.hist_after.tolist(),
                 **counts_info}
        (out_dir / d / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        fig = difficulty_histogram(plan.hist_before, plan.hist_after,
                                   title=f"{d}: pass count of {p.n_samples} student samples ({plan.shape})")
        fig.savefig(out_dir / d / "histogram.png", dpi=110, bbox_inches="tight")
        for name in ("histogram.png", BALANCED_FILE, "stats.json"):
            tracker.log_artifact(out_dir / d / name, artifact_path=d)
        metrics |= {f"{d}/mean_pass_rate": float(counts.mean() / p.n_samples),
                    f"{d}/balanced_prompts": float(len(balanced)),
                    f"{d}/prompts": float(len(records)), f"{d}/scored_prompts": float(len(scored)),
                    f"{d}/shape_is_U": float(plan.shape == "U"), f"{d}/shape_is_J": float(plan.shape == "J")}
    report(len(cfg.domains), len(cfg.domains), "domains", force=True)
    tracker.log_metrics(metrics)
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("difficulty", run))
