"""Stage `evaluate:<model stage>`: avg@k (and pass@k) per domain of the models one stage produced
(the SFT student, a teacher, a distilled student, the merges), on every domain's held-out prompts
(ALGORITHMS §8). One evaluation per model, shared by every pipeline that has that model; each
pipeline's `report` stage puts them side by side."""

from __future__ import annotations

import json

from mopd.artifacts import MODELS_FILE, Result
from mopd.data import read_split
from mopd.evaluation import evaluate_model
from mopd.progress import report
from mopd.settings.evaluate import EvaluateParams
from mopd.stage import StageContext
from mopd.stats import bootstrap_indices, mean_ci

SCORES_FILE = "scores.json"


def run(ctx: StageContext) -> Result:
    """Evaluate every model of stage ``model`` (its models.json) on every benchmark of every
    domain (a benchmark is a domain's eval split, checked by that domain's verifier)."""
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    model = ctx.args["model"]
    models: dict[str, str] = json.loads((ctx.role("model") / MODELS_FILE).read_text())
    problems = {b: (cfg.domain(b).verifier, read_split(ctx.role("data"), b, "eval"))
                for d in cfg.domains for b in cfg.benchmarks(d)}
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for i, (label, rel) in enumerate(models.items()):
        report(i, len(models), "models", force=True)
        scores[label] = evaluate_model(ctx.role("model") / rel, problems, cfg.params.evaluate,
                                       cfg.params.seed, ctx.prompt_format)
    report(len(models), len(models), "models", force=True)
    (out_dir / SCORES_FILE).write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
    metrics = {f"{stat}/{label}/{bench}": float(v[stat2])
               for label, per in scores.items() for bench, v in per.items()
               for stat, stat2 in (("avg_at_k", "avg@k"), ("pass_at_k", "pass@k"))}
    tracker.log_metrics(metrics)
    # One child run per method, with the same metric names for every method (avg_at_k/<bench>,
    # its interval, pass_at_k/<bench>), so MLflow's run comparison lines methods up side by side.
    ev: EvaluateParams = cfg.params.evaluate
    for label, per in scores.items():
        child = {}
        for bench, v in per.items():
            idx = bootstrap_indices(len(v["per_prompt_avg"]), n_boot=ev.bootstrap, seed=cfg.params.seed)
            lo, hi = mean_ci(v["per_prompt_avg"], idx, ev.ci_level)
            child |= {f"avg_at_k/{bench}": v["avg@k"], f"avg_at_k_ci_lo/{bench}": lo,
                      f"avg_at_k_ci_hi/{bench}": hi, f"pass_at_k/{bench}": v["pass@k"]}
        with tracker.child(label, kind="method", method=label, stage=f"evaluate:{model}") as run:
            run.log_metrics(child)
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("evaluate", run))
