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
    gains.to_csv(args.out / "teacher_gains.csv", index=False)
    threads = os.environ.get("MOPD_THREADS", "default")
    title = f"{args.pipeline}: avg@k, mean ± sd over seeds {args.seeds} (threads: {threads})"
    chart(summary, title).savefig(args.out / "study.png", dpi=110, bbox_inches="tight")
    md = markdown(summary)
    (args.out / "study.md").write_text(f"{title}\n\n{md}\n")
    total = time.time() - t_start
    print(f"\n{title}\n{md}\n\nteacher gain over SFT on its own domain (95% CI over prompts):")
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
        for name in ("study.csv", "teacher_gains.csv", "study.png", "study.md"):
            run.log_artifact(args.out / name)
        run.end("FINISHED")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
