"""Stage `budget_curve:<pipeline>`: the efficiency comparison (MOPD's claim is integration quality
*and* efficiency; ALGORITHMS §9). For each curve method of the pipeline (every distillation stage
and Mix-RL), its normalised score (MOPD 4.1, with the report's bootstrap interval over prompts)
at each snapshot its training saved (`snapshot_every`) and at its end, against the student
rollouts it had sampled by then (`budget/rollouts_per_step` x step). Evaluated exactly as the
`evaluate` stages do (same section, seed and prompts), normalised against the same SFT and
teacher evaluations. CSV + PNG, one MLflow metric per point (step = rollouts)."""

from __future__ import annotations

import json

import pandas as pd

from mopd.artifacts import MODELS_FILE, Result, load_result
from mopd.data import read_split
from mopd.evaluation import evaluate_model
from mopd.snapshots import SNAPSHOTS
from mopd.plots import budget_curve_chart
from mopd.progress import report
from mopd.stage import StageContext
from mopd.stats import comparison

SCORES_FILE = "scores.json"  # written by tasks.evaluate


def curve_points(stage_dir) -> list[tuple[int, str]]:
    """(step, model folder relative to the stage folder) of every snapshot, then the final model
    (step None is resolved by the caller from the stage's record)."""
    snaps = sorted((stage_dir / SNAPSHOTS).glob("step-*")) if (stage_dir / SNAPSHOTS).is_dir() else []
    return [(int(p.name.split("-")[1]), f"{SNAPSHOTS}/{p.name}") for p in snaps]


def run(ctx: StageContext) -> Result:
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    pipeline, p = ctx.args["pipeline"], cfg.params.evaluate
    domains = [d for d in cfg.local_teacher_domains]
    evaluated: dict[str, dict] = {}
    for path in ctx.roles_of("evaluations").values():
        evaluated |= json.loads((path / SCORES_FILE).read_text())
    reference = {m: s for m, s in evaluated.items() if m == "sft" or m.startswith("teacher:")}
    if "sft" not in reference or any(f"teacher:{d}" not in reference for d in domains):
        raise ValueError(f"budget_curve:{pipeline}: needs the evaluations of SFT and every local teacher "
                         f"(got {sorted(reference)}): list `evaluate` in the pipeline")
    problems = {b: (cfg.domain(b).verifier, read_split(ctx.role("data"), b, "eval"))
                for d in cfg.domains for b in cfg.benchmarks(d)}
    todo = []
    for stage, path in ctx.roles_of("curves").items():
        label = next(iter(json.loads((path / MODELS_FILE).read_text())))
        metrics = load_result(path).metrics
        per_step = metrics.get("budget/rollouts_per_step")
        total = metrics.get("budget/student_rollouts")
        if not per_step or not total:
            raise ValueError(f"budget_curve:{pipeline}: stage {stage}'s record has no budget (budget/*): rerun it")
        todo += [(label, step * per_step, path / rel) for step, rel in curve_points(path)]
        todo.append((label, total, path / "model"))
    scores = dict(reference)
    for i, (label, rollouts, model_dir) in enumerate(todo):
        report(i, len(todo), "models", force=True)
        final = model_dir.name == "model" and label in evaluated  # its `evaluate` stage made the same call
        scores[f"{label}@{int(rollouts)}"] = (evaluated[label] if final else
                                              evaluate_model(model_dir, problems, p, cfg.params.seed, ctx.prompt_format))
    report(len(todo), len(todo), "models", force=True)
    table = comparison(scores, {d: cfg.benchmarks(d) for d in domains}, student="sft",
                       teachers={d: f"teacher:{d}" for d in domains}, level=p.ci_level, n_boot=p.bootstrap,
                       seed=cfg.params.seed)
    rows = []
    for label, rollouts, _ in todo:
        entry = table["methods"][f"{label}@{int(rollouts)}"]
        ci = entry["normalized_ci"] or (None, None)
        rows.append({"method": label, "student_rollouts": int(rollouts), "normalized": entry["normalized"],
                     "ci_lo": ci[0], "ci_hi": ci[1],
                     **{f"avg_{b}": c["avg"] for b, c in entry["domains"].items()}})
    frame = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame["avg_mean"] = frame[[c for c in frame if c.startswith("avg_")]].mean(axis=1)
    if frame["normalized"].notna().any():
        fig = budget_curve_chart(frame.dropna(subset=["normalized"]), f"{pipeline}: normalised score against the "
                                 f"student rollouts sampled ({p.ci_level:.0%} bootstrap CI over prompts)")
    else:  # no teacher gain is significant: there is no normalised score to draw
        fig = budget_curve_chart(frame, f"{pipeline}: mean avg@{p.k} over benchmarks against the student rollouts "
                                 "sampled (no normalised score: no teacher gain is significant)", value="avg_mean",
                                 lo="-", hi="-")
    frame.to_csv(out_dir / "budget_curve.csv", index=False)
    fig.savefig(out_dir / "budget_curve.png", dpi=120)
    tracker.log_figure(fig, "budget_curve.png")
    tracker.log_artifact(out_dir / "budget_curve.csv")
    for r in rows:
        if r["normalized"] is not None:
            tracker.log_metrics({f"budget_curve/{r['method']}/normalized": r["normalized"]}, step=r["student_rollouts"])
    finals = {f"final/{r['method']}": r["normalized"] for r in rows if r["normalized"] is not None}
    return ctx.result({"points": float(len(rows))} | {k.replace(":", "_"): v for k, v in finals.items()})


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("budget_curve", run))
