"""The distillation sweep behind the `distill` defaults (issue 25): MOPD (`mopd_pg`) from each
seed's own SFT student and teachers, one run per (setting, seed), each scored as the pipeline
scores it (the `evaluate` section on the held-out prompts, the report's normalised score against
that seed's SFT and teachers) plus the reverse KL to the math teacher along the student's own
math rollouts (the `teacher_fit` measurement). Prints a table of mean ± sd over seeds and
appends one JSON line per run to ``--out``.

    python benchmarks/distill_sweep.py --projects P0 P1 P2 --set lr1e-4 learning_rate=1e-4 max_steps=300 ...

Each project is a finished seed folder (params.yaml with its seed; `sft`, `teacher:*`,
`difficulty` and `evaluate:sft`/`evaluate:teacher:*` done: e.g. the seeds study's
`.mopd/study/seed<s>`, or `mopd run` of a pipeline with those stages). Settings are
`name key=value ...` groups on top of the project's `distill` section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _value(text: str):
    return yaml.safe_load(text)


def run_one(project: Path, name: str, overrides: dict, out_root: Path, pipeline: str = "full") -> dict:
    from mopd.analysis import divergence_along_rollouts
    from mopd.chat import prompt_format
    from mopd.config import load_config
    from mopd.data import read_balanced, read_split
    from mopd.evaluation import evaluate_model
    from mopd.models import load_model, load_tokenizer
    from mopd.stats import comparison
    from mopd.tracking import NullTracker
    from mopd.trainers.distill import train_distill
    from mopd.verifiers import verify_batch

    cfg = load_config(project, pipeline=pipeline)
    fmt = prompt_format(cfg.params.model_profile)
    seed, art = cfg.params.seed, project / "artifacts"
    params = cfg.params.distill.model_copy(update=overrides)
    params = type(params).model_validate(params.model_dump())  # the validators see the overrides
    domains = cfg.local_teacher_domains
    kinds = {d: cfg.domain(d).verifier for d in domains}
    prompts = {d: read_balanced(art / "difficulty", d) if params.offline_balance
               else read_split(art / "data", d, "train") for d in domains}
    out = out_root / f"seed{seed}" / name
    t0 = time.time()
    history = train_distill(art / "sft" / "model", {d: art / "teachers" / d / "model" for d in domains}, prompts,
                            out, params, seed, NullTracker(), fmt=fmt,
                            score_fn=lambda d, texts, refs: [v.reward for v in
                                                             verify_batch([kinds[d]] * len(texts), texts, refs)])
    train_s = time.time() - t0
    problems = {b: (cfg.domain(b).verifier, read_split(art / "data", b, "eval")) for d in domains
                for b in cfg.benchmarks(d)}
    scores = {"sft": json.loads((art / "evaluate" / "sft" / "scores.json").read_text())["sft"]}
    for d in domains:
        scores[f"teacher:{d}"] = json.loads((art / "evaluate" / f"teacher-{d}" / "scores.json").read_text())[
            f"teacher:{d}"]
    scores[name] = evaluate_model(out / "model", problems, cfg.params.evaluate, seed, fmt)
    p = cfg.params.evaluate
    table = comparison(scores, {d: cfg.benchmarks(d) for d in domains}, student="sft",
                       teachers={d: f"teacher:{d}" for d in domains}, level=p.ci_level, n_boot=p.bootstrap, seed=seed)
    tok = load_tokenizer(art / "sft" / "model")
    fit = cfg.params.teacher_fit
    math_prompts = [r["prompt"] for r in read_split(art / "data", "math", "eval")[: fit.prompts]]
    teacher = load_model(art / "teachers" / "math" / "model")
    kl = {who: divergence_along_rollouts(load_model(path), teacher, tok, math_prompts, fmt=fmt,
                                         n=fit.samples, max_new_tokens=fit.max_new_tokens,
                                         temperature=fit.temperature, seed=seed, k=fit.topk)["reverse_kl"]
          for who, path in (("sft", art / "sft" / "model"), (name, out / "model"))}
    m = table["methods"]
    gain = {d: m[f"teacher:{d}"]["domains"][d]["avg"] - m["sft"]["domains"][d]["avg"] for d in domains}
    row = {"setting": name, "seed": seed, "overrides": overrides, "normalized": m[name]["normalized"],
           **{f"avg_{d}": m[name]["domains"][d]["avg"] for d in domains},
           "math_recovered": (m[name]["domains"]["math"]["avg"] - m["sft"]["domains"]["math"]["avg"]) / gain["math"],
           "rkl_math_student": kl[name], "rkl_math_sft": kl["sft"],
           "student_rollouts": params.max_steps * params.prompts_per_step * params.samples_per_prompt,
           "train_seconds": round(train_s, 1),
           "final_reverse_kl": float(np.mean([v for _, v in history["distill/reverse_kl"][-10:]]))}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--projects", type=Path, nargs="+", required=True)
    parser.add_argument("--set", nargs="+", action="append", required=True, metavar="NAME KEY=VALUE",
                        help="a setting: its name, then distill overrides")
    parser.add_argument("--out", type=Path, default=ROOT / ".mopd" / "sweep")
    parser.add_argument("--pipeline", default="full", help="the pipeline whose domains and teachers to use")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "sweep.jsonl"
    rows = []
    for name, *kvs in args.set:
        overrides = {k: _value(v) for k, v in (kv.split("=", 1) for kv in kvs)}
        for proj in args.projects:
            row = run_one(proj.resolve(), name, overrides, args.out, args.pipeline)
            rows.append(row)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    by = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)
    print(f"\n{'setting':<24} {'seeds':>5} {'normalised':>16} {'min':>6} {'math recovered':>16} "
          f"{'rKL math (sft)':>18} {'rollouts':>9}")
    for name, rs in by.items():
        n = np.array([r["normalized"] for r in rs], dtype=float)
        rec = np.array([r["math_recovered"] for r in rs])
        kl = np.array([r["rkl_math_student"] for r in rs])
        sft = np.array([r["rkl_math_sft"] for r in rs])
        sd = n.std(ddof=1) if len(n) > 1 else float("nan")
        print(f"{name:<24} {len(rs):>5} {n.mean():>8.3f} ± {sd:.3f} {n.min():>6.3f} {rec.mean():>16.3f} "
              f"{kl.mean():>8.3f} ({sft.mean():.3f}) {rs[0]['student_rollouts']:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
