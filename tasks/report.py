"""Stage `report:<pipeline>`: the pipeline's comparison table — every method it ran, per domain —
and the MOPD normalised score (MOPD 4.1, ALGORITHMS §8), from the `evaluate:*` stages; CSV + PNG,
logged to MLflow. The one stage named by its pipeline: comparing that pipeline's methods is what
it computes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mopd.artifacts import Result, finalize
from mopd.config import Config
from mopd.evaluation import score_tables

STUDENT = "sft"
SCORES_FILE = "scores.json"  # written by tasks.evaluate


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker, *, pipeline: str) -> Result:
    """Gather the evaluations of ``pipeline``'s models into its score tables."""
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for stage in sorted(inputs, key=list(inputs).index):  # upstream order: sft, teachers, methods
        scores |= json.loads((inputs[stage] / SCORES_FILE).read_text())
    # Normalised per domain against that domain's own teacher; a domain whose teacher is a remote
    # endpoint has no checkpoint here to evaluate, so it is left out of the normalised table.
    local = [d for d in cfg.local_teacher_domains if f"teacher:{d}" in scores]
    if STUDENT in scores and local:
        table, norm = score_tables(scores, {d: cfg.benchmarks(d)[:1] for d in local},
                                   student=STUDENT, teachers={d: f"teacher:{d}" for d in local})
    else:  # nothing to normalise against: the avg@k table alone
        table = pd.DataFrame({m: {b: v["avg@k"] for b, v in s.items()} for m, s in scores.items()}).T
        norm = pd.DataFrame()
    table.to_csv(out_dir / "avg_at_k.csv", index_label="method")
    norm.to_csv(out_dir / "normalized.csv", index_label="method")
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")

    from mopd.plots import score_table_chart

    k = cfg.params.evaluate.k
    figures = {"avg_at_k.png": score_table_chart(table, f"{pipeline}: avg@{k} per domain")}
    if not norm.empty:
        figures["normalized.png"] = score_table_chart(norm, f"{pipeline}: normalised score "
                                                            "(0 = SFT, 1 = teacher)")
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        tracker.log_artifact(out_dir / name)
    for name in ("avg_at_k.csv", "normalized.csv"):
        tracker.log_artifact(out_dir / name)
    metrics = {f"avg_at_k/{m}/{b}": float(v) for m, row in table.iterrows() for b, v in row.items()}
    metrics |= {f"normalized/{m}/{c}": float(v) for m, row in norm.iterrows() for c, v in row.items()}
    tracker.log_metrics(metrics)
    return finalize(f"report:{pipeline}", cfg.project_dir, out_dir, metrics)


if __name__ == "__main__":
    from tasks.cli import main

    raise SystemExit(main("report", run))
