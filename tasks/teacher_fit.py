"""Stage `teacher_fit:<pipeline>`: how close each method of the pipeline ends to each domain's
teacher (ALGORITHMS §8; MOPD Table 2's methods, CoPD §2): for every model the pipeline trains and
every domain with a local teacher, the exact per-token reverse KL ``KL(π_method ‖ π_teacher)``
and the top-k overlap, along the method's *own* rollouts on that domain's held-out prompts (the
states it visits, where on-policy distillation pulls it to the teacher). CSV + heatmap PNG, and
one MLflow metric per cell. Named by its pipeline, like the report: it compares that
pipeline's methods."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

from mopd.analysis import divergence_along_rollouts
from mopd.artifacts import MODELS_FILE, Result
from mopd.data import read_split
from mopd.models import load_model, load_tokenizer
from mopd.plots import score_table_chart
from mopd.progress import report
from mopd.settings.analysis import TeacherFitParams
from mopd.stage import StageContext


def run(ctx: StageContext) -> Result:
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    pipeline = ctx.args["pipeline"]
    p: TeacherFitParams = cfg.params.teacher_fit
    rng = random.Random(cfg.params.seed)
    domains = cfg.local_teacher_domains
    if not domains:
        raise ValueError(f"teacher_fit: pipeline {pipeline!r} trains no teacher to compare against")
    prompts = {}
    for d in domains:
        recs = read_split(ctx.role("data"), d, "eval")
        prompts[d] = [r["prompt"] for r in rng.sample(recs, min(p.prompts, len(recs)))]
    methods: dict[str, Path] = {}
    for path in ctx.roles_of("models").values():
        for label, rel in json.loads((path / MODELS_FILE).read_text()).items():
            methods[label] = path / rel
    teachers = {d: methods[f"teacher:{d}"] for d in domains}
    tokenizer = load_tokenizer(teachers[domains[0]])
    teacher_models = {d: load_model(t) for d, t in teachers.items()}
    rows = []
    todo = [m for m in methods if not m.startswith("teacher:")]
    for i, label in enumerate(todo):
        report(i, len(todo), "methods", force=True)
        model = load_model(methods[label])
        for d in domains:
            got = divergence_along_rollouts(model, teacher_models[d], tokenizer, prompts[d],
                                            fmt=ctx.prompt_format, n=p.samples,
                                            max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                            seed=cfg.params.seed, k=p.topk)
            rows.append({"method": label, "domain": d, **got})
    report(len(todo), len(todo), "methods", force=True)
    table = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "teacher_fit.csv", index=False)
    metrics = {f"{key}/{r['method']}/{r['domain']}": float(r[key]) for _, r in table.iterrows()
               for key in ("reverse_kl", "topk_overlap")}
    tracker.log_metrics(metrics)
    tracker.log_artifact(out_dir / "teacher_fit.csv")
    for key, what in (("reverse_kl", "reverse KL to the domain's teacher (lower = closer)"),
                      ("topk_overlap", f"top-{p.topk} overlap with the domain's teacher")):
        wide = table.pivot(index="method", columns="domain", values=key).reindex(index=todo, columns=domains)
        fig = score_table_chart(wide, f"{pipeline}: {what}, along each method's own rollouts")
        fig.savefig(out_dir / f"{key}.png", dpi=120)
        tracker.log_figure(fig, f"{key}.png")
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("teacher_fit", run))
