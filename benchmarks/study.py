"""Seeds study (`make study`): the `full` pipeline over several seeds that share nothing but the
code, and each method's score as mean ± sd over seeds, with every seed's teacher gains and their
95% intervals. Writes CSV, PNG and a Markdown table under the study folder and one MLflow run
(`kind=study`).

    python benchmarks/study.py --seeds 0 1 2 [--pipeline full] [--out .mopd/study] [--threads N]

Each seed is its own project folder (`<out>/seed<s>/`: params.yaml with that seed, the repo's
pipelines.yaml) run stage after stage by `mopd.local_run` (the flow's commands and cache rules,
no server); finished seeds are cached, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mopd.config import load_config  # noqa: E402
from mopd.local_run import run_pipeline  # noqa: E402

GAIN_TARGET = 0.10  # issue 10: each teacher beats SFT on its own domain by >= 0.10 avg@k


def _seed_project(out: Path, seed: int) -> Path:
    proj = out / f"seed{seed}"
    proj.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seed"] = seed
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / "pipelines.yaml", proj / "pipelines.yaml")
    return proj


def aggregate(tables: dict[int, dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per method x benchmark: mean, sd and each seed's value; per seed x domain: teacher gain)."""
    rows = []
    methods = list(next(iter(tables.values()))["methods"])
    for m in methods:
        benches = sorted({b for t in tables.values() for b in t["methods"].get(m, {}).get("domains", {})})
        for b in [*benches, "normalized"]:
            vals = {}
            for seed, t in tables.items():
                entry = t["methods"].get(m)
                if entry is None:
                    continue
                v = entry["normalized"] if b == "normalized" else entry["domains"].get(b, {}).get("avg")
                vals[seed] = np.nan if v is None else float(v)
            arr = np.array(list(vals.values()), dtype=float)
            ok = arr[np.isfinite(arr)]
            rows.append({"method": m, "column": b, "mean": ok.mean() if ok.size else np.nan,
                         "sd": ok.std(ddof=1) if ok.size > 1 else np.nan, "seeds_with_value": ok.size,
                         **{f"seed{s}": v for s, v in vals.items()}})
    gains = []
    for seed, t in tables.items():
        for d, g in t["teacher_gain"].items():
            if g.get("gain") is None:
                continue
            gains.append({"seed": seed, "domain": d, "gain": g["gain"], "ci_lo": g["ci"][0],
                          "ci_hi": g["ci"][1], "significant": g["significant"],
                          f"gain>={GAIN_TARGET}": g["gain"] >= GAIN_TARGET and g["ci"][0] > 0})
    return pd.DataFrame(rows), pd.DataFrame(gains)


def budget_curves(projects: dict[int, Path], pipeline: str) -> pd.DataFrame:
    """Every seed's budget curve (stage `budget_curve:<pipeline>`), one row per seed x method x budget."""
    frames = []
    for seed, proj in projects.items():
        path = proj / "artifacts" / "analysis" / "budget_curve" / pipeline / "budget_curve.csv"
        if path.is_file():
            frames.append(pd.read_csv(path).assign(seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def curve_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over seeds of the normalised score at each (method, student rollouts), with the
    mean of the per-seed bootstrap bounds."""
    g = curves.groupby(["method", "student_rollouts"], sort=False)
    out = g.agg(normalized=("normalized", "mean"), sd=("normalized", "std"), seeds=("normalized", "count"),
                ci_lo=("ci_lo", "mean"), ci_hi=("ci_hi", "mean")).reset_index()
    return out.sort_values(["method", "student_rollouts"], kind="stable")


def mopd_checks(tables: dict[int, dict], projects: dict[int, Path], pipeline: str, method: str = "mopd",
                domain: str = "math", merge: str = "merge:task_arithmetic") -> pd.DataFrame:
    """Per seed, what issue 25 asks of MOPD: its normalised score, the share of the math teacher's
    gain it recovers, its reverse KL to the math teacher along its own rollouts against SFT's
    (stage `teacher_fit`), and its margin over task arithmetic."""
    rows = []
    for seed, t in tables.items():
        m = t["methods"]
        sft, teacher, got = (m[k]["domains"][domain]["avg"] for k in ("sft", f"teacher:{domain}", method))
        fit_path = projects[seed] / "artifacts" / "analysis" / "teacher_fit" / pipeline / "teacher_fit.csv"
        fit = pd.read_csv(fit_path) if fit_path.is_file() else None

        def rkl(label):
            if fit is None:
                return np.nan
            r = fit[(fit.method == label) & (fit.domain == domain)]
            return float(r.reverse_kl.iloc[0]) if len(r) else np.nan

        norm, ta = m[method]["normalized"], (m.get(merge) or {}).get("normalized")
        rows.append({"seed": seed, "normalized": norm, f"{domain}_recovered": (got - sft) / (teacher - sft),
                     f"rkl_{domain}": rkl(method), f"rkl_{domain}_sft": rkl("sft"),
                     "above_task_arithmetic": None if norm is None or ta is None else norm - ta})
    return pd.DataFrame(rows)


def chart(summary: pd.DataFrame, title: str):
    from mopd.plots import score_table_chart

    s = summary[summary.column != "normalized"]
    mean = s.pivot(index="method", columns="column", values="mean").reindex(s.method.unique())
    sd = s.pivot(index="method", columns="column", values="sd").reindex(mean.index)
    return score_table_chart(mean, title, ci=(mean - sd.fillna(0), mean + sd.fillna(0)))


def markdown(summary: pd.DataFrame) -> str:
    cols = list(dict.fromkeys(summary.column))
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in dict.fromkeys(summary.method):
        cells = []
        for c in cols:
            r = summary[(summary.method == m) & (summary.column == c)]
            if r.empty or not np.isfinite(r["mean"].iloc[0]):
                cells.append("—")
            else:
                sd = r["sd"].iloc[0]
                cells.append(f"{r['mean'].iloc[0]:.3f} ± {sd:.3f}" if np.isfinite(sd) else f"{r['mean'].iloc[0]:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pipeline", default="full")
    parser.add_argument("--out", type=Path, default=ROOT / ".mopd" / "study")
    parser.add_argument("--threads", type=int, default=None, help="MOPD_THREADS for every stage")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    if len(args.seeds) < 3:
        print("note: fewer than 3 seeds gives no usable spread", file=sys.stderr)
    if args.threads:
        os.environ["MOPD_THREADS"] = str(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start, tables, seconds = time.time(), {}, {}
    for seed in args.seeds:
        proj = _seed_project(args.out, seed)
        print(f"== seed {seed}: {proj}", flush=True)
        t0 = time.time()
        run_pipeline(load_config(proj, pipeline=args.pipeline), track=False)
        seconds[seed] = time.time() - t0
        tables[seed] = json.loads((proj / "artifacts" / "report" / args.pipeline / "table.json").read_text())
    summary, gains = aggregate(tables)
    summary.to_csv(args.out / "study.csv", index=False)
    projects = {seed: args.out / f"seed{seed}" for seed in args.seeds}
    curves = budget_curves(projects, args.pipeline)
    curve_md, checks_md = "", ""
    if len(curves):
        from mopd.plots import budget_curve_chart

        curves.to_csv(args.out / "budget_curves.csv", index=False)
        cs = curve_summary(curves)
        cs.to_csv(args.out / "budget_curve_summary.csv", index=False)
        band = cs.assign(lo=cs.normalized - cs.sd.fillna(0), hi=cs.normalized + cs.sd.fillna(0))
        budget_curve_chart(band, f"{args.pipeline}: normalised score against student rollouts, mean ± sd over "
                           f"seeds {args.seeds}", lo="lo", hi="hi").savefig(args.out / "budget_curve.png", dpi=110)
        curve_md = "\n".join(["| method | student rollouts | normalised (mean ± sd) | seeds |", "|---|---|---|---|"] + [
            f"| {r.method} | {r.student_rollouts:,} | {r.normalized:.3f} ± {r.sd:.3f} | {r.seeds} |"
            for r in cs.itertuples()])
    if all("mopd" in t["methods"] for t in tables.values()):
        checks = mopd_checks(tables, projects, args.pipeline)
        checks.to_csv(args.out / "mopd_checks.csv", index=False)
        checks_md = "\n".join(["| " + " | ".join(checks.columns) + " |", "|---" * len(checks.columns) + "|"] + [
            "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |"
            for row in checks.itertuples(index=False)])
    gains.to_csv(args.out / "teacher_gains.csv", index=False)
    threads = os.environ.get("MOPD_THREADS", "default")
    title = f"{args.pipeline}: avg@k, mean ± sd over seeds {args.seeds} (threads: {threads})"
    chart(summary, title).savefig(args.out / "study.png", dpi=110, bbox_inches="tight")
    md = markdown(summary)
    order = summary[summary.column == "normalized"].sort_values("mean", ascending=False)
    ordering = " > ".join(f"{r.method} ({r['mean']:.3f})" for _, r in order.iterrows() if np.isfinite(r["mean"]))
    extra = (f"\n\nordering by mean normalised score: {ordering}\n"
             + (f"\nMOPD per seed (issue 25's checks):\n\n{checks_md}\n" if checks_md else "")
             + (f"\nbudget curve (stage budget_curve, mean ± sd over seeds):\n\n{curve_md}\n" if curve_md else ""))
    (args.out / "study.md").write_text(f"{title}\n\n{md}\n{extra}")
    total = time.time() - t_start
    print(f"\n{title}\n{md}\n{extra}\nteacher gain over SFT on its own domain (95% CI over prompts):")
    print(gains.to_string(index=False))
    ok = bool(len(gains)) and bool(gains[f"gain>={GAIN_TARGET}"].all())
    print(f"\nevery teacher gains >= {GAIN_TARGET} with an interval above 0 in every seed: {ok}")
    print(f"seconds per seed: {({s: round(v) for s, v in seconds.items()})}; study total {total:.0f} s")
    if not args.no_mlflow:
        from mopd.tracking import MLflowTracker, default_tracking_uri

        run = MLflowTracker.start("mopd", f"study-{args.pipeline}", tracking_uri=default_tracking_uri(ROOT),
                                  tags={"kind": "study", "pipeline": args.pipeline})
        run.log_params({"seeds": ",".join(map(str, args.seeds)), "threads": threads})
        run.log_metrics({f"mean/{r.method}/{r.column}": r["mean"] for _, r in summary.iterrows()
                         if np.isfinite(r["mean"])}
                        | {f"sd/{r.method}/{r.column}": r["sd"] for _, r in summary.iterrows()
                           if np.isfinite(r["sd"])}
                        | {"study_seconds": total, "all_teachers_gain": float(ok)})
        for name in ("study.csv", "teacher_gains.csv", "study.png", "study.md", "budget_curve.png",
                     "budget_curve_summary.csv", "mopd_checks.csv"):
            if (args.out / name).is_file():
                run.log_artifact(args.out / name)
        run.end("FINISHED")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
