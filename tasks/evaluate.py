"""Stage `evaluate`: avg@k per domain for the SFT student, each teacher, the MOPD student and the
merges; the MOPD normalised score table (ALGORITHMS §8); CSV + PNG, logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from mopd.artifacts import Result, finalize
from mopd.config import Config
from mopd.data import read_split
from mopd.evaluation import evaluate_model, score_tables

STUDENT = "sft"


def candidates(cfg: Config, inputs: dict[str, Path]) -> dict[str, Path]:
    """Method label -> checkpoint directory, for every model stage the pipeline ran."""
    out = {STUDENT: inputs["sft"] / "model"}
    out |= {f"teacher:{d}": inputs[f"teacher:{d}"] / "model" for d in cfg.domains if f"teacher:{d}" in inputs}
    if "distill" in inputs:
        out["mopd"] = inputs["distill"] / "model"
    if "merge" in inputs:
        out |= {f"merge:{m}": inputs["merge"] / m for m in cfg.params.merge.methods}
    return out


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker, *, domain=None) -> Result:
    """Evaluate every model on every domain's held-out prompts and write the score tables."""
    problems = {d: (cfg.domain(d).verifier, read_split(inputs["data"], d, "eval")) for d in cfg.domains}
    scores = {}
    for method, model_dir in candidates(cfg, inputs).items():
        per_domain = evaluate_model(model_dir, problems, cfg.params.evaluate, cfg.params.seed)
        # One benchmark per domain for the synthetic default: the domain's held-out split.
        scores[method] = {cfg.benchmarks(d)[0]: v for d, v in per_domain.items()}
    # Normalised per domain against that domain's own teacher; a domain whose teacher is a remote
    # endpoint has no checkpoint here to evaluate, so it is left out of the normalised table.
    local = cfg.local_teacher_domains
    table, norm = score_tables(scores, {d: cfg.benchmarks(d)[:1] for d in local},
                               student=STUDENT, teachers={d: f"teacher:{d}" for d in local})
    table.to_csv(out_dir / "avg_at_k.csv", index_label="method")
    norm.to_csv(out_dir / "normalized.csv", index_label="method")
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")

    from mopd.plots import score_table_chart

    k = cfg.params.evaluate.k
    figures = {"avg_at_k.png": score_table_chart(table, f"avg@{k} per domain"),
               "normalized.png": score_table_chart(norm, "MOPD normalised score (0 = SFT, 1 = teacher)")}
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        tracker.log_artifact(out_dir / name)
    for name in ("avg_at_k.csv", "normalized.csv"):
        tracker.log_artifact(out_dir / name)
    metrics = {f"avg_at_k/{m}/{b}": float(v) for m, row in table.iterrows() for b, v in row.items()}
    metrics |= {f"normalized/{m}/{c}": float(v) for m, row in norm.iterrows() for c, v in row.items()}
    tracker.log_metrics(metrics)
    return finalize("evaluate", cfg.project_dir, out_dir, metrics)


if __name__ == "__main__":
    from tasks.cli import main

    raise SystemExit(main("evaluate", run))
