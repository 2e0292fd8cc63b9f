"""Stage `report:<pipeline>`: the pipeline's comparison table — every method it ran, per domain,
avg@k and pass@k with 95% bootstrap intervals over prompts — and the MOPD normalised score
(MOPD 4.1, ALGORITHMS §8) where the teacher's gain over SFT is significant (else the cell says
why it is missing). From the `evaluate:*` stages; CSV + JSON + PNG, logged to MLflow. The one stage
named by its pipeline: comparing that pipeline's methods is what it computes."""

from __future__ import annotations

import functools
import json
import math
from typing import TYPE_CHECKING

import pandas as pd

from mopd.artifacts import RESULT_FILE, Result, load_result
from mopd.graph import build_graph
from mopd.stage import StageContext
from mopd.stats import comparison
from mopd.teachers.ledger import FIELDS

if TYPE_CHECKING:
    from mopd.config import Config

STUDENT = "sft"
SCORES_FILE = "scores.json"  # written by tasks.evaluate
TABLE_FILE = "table.json"
COST_FIELDS = (*FIELDS, "student_tokens")
BUDGET_FIELDS = ("integration_rollouts", "integration_tokens", "total_rollouts", "total_tokens")


def run(ctx: StageContext) -> Result:
    """Gather the evaluations of ``pipeline``'s models into its comparison table."""
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    pipeline = ctx.args["pipeline"]
    evaluations = ctx.roles_of("evaluations")
    scores: dict[str, dict[str, dict]] = {}
    for path in evaluations.values():  # upstream order: sft, teachers, methods
        scores |= json.loads((path / SCORES_FILE).read_text())
    # Normalised per domain against that domain's own teacher; a domain whose teacher is a remote
    # endpoint has no checkpoint here to evaluate, so it is left out of the normalised table.
    local = [d for d in cfg.local_teacher_domains if f"teacher:{d}" in scores]
    p = cfg.params.evaluate
    table = comparison(scores, {d: cfg.benchmarks(d) for d in local}, student=STUDENT,
                       teachers={d: f"teacher:{d}" for d in local}, level=p.ci_level,
                       n_boot=p.bootstrap, seed=cfg.params.seed)
    table |= {"pipeline": pipeline, "n": p.n, "k": p.k}
    costs, budget = teacher_costs(cfg, list(evaluations)), budgets(cfg, list(evaluations))
    for m, entry in table["methods"].items():
        entry["teacher_cost"] = costs.get(m)
        entry["budget"] = budget.get(m)
    (out_dir / TABLE_FILE).write_text(json.dumps(table, indent=2) + "\n")

    avg, lo, hi, long_rows = {}, {}, {}, []
    for m, entry in table["methods"].items():
        for b, c in entry["domains"].items():
            avg.setdefault(m, {})[b], (lo.setdefault(m, {})[b], hi.setdefault(m, {})[b]) = c["avg"], c["ci"]
            long_rows.append({"method": m, "benchmark": b, "avg_at_k": c["avg"], "ci_lo": c["ci"][0],
                              "ci_hi": c["ci"][1], "pass_at_k": c["pass"], "pass_ci_lo": c["pass_ci"][0],
                              "pass_ci_hi": c["pass_ci"][1], "n_prompts": c["n_prompts"]})
    avg_df, lo_df, hi_df = (pd.DataFrame(x).T for x in (avg, lo, hi))
    avg_df.to_csv(out_dir / "avg_at_k.csv", index_label="method")
    pd.DataFrame(long_rows).to_csv(out_dir / "table.csv", index=False)
    norm_df, nlo_df, nhi_df = _normalized_frames(table, local)
    norm_df.to_csv(out_dir / "normalized.csv", index_label="method")

    from mopd.plots import score_table_chart

    level = f"{p.ci_level:.0%}"
    figures = {"avg_at_k.png": score_table_chart(
        avg_df, f"{pipeline}: avg@{p.k} per domain ({level} bootstrap CI over prompts)", ci=(lo_df, hi_df))}
    numeric = norm_df.drop(columns=["note"])
    if local and numeric.notna().to_numpy().any():
        figures["normalized.png"] = score_table_chart(
            numeric, f"{pipeline}: normalised score (0 = SFT, 1 = teacher; — = teacher gain not "
                     f"significant)", ci=(nlo_df, nhi_df))
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        tracker.log_artifact(out_dir / name)
    for name in ("avg_at_k.csv", "normalized.csv", "table.csv", TABLE_FILE):
        tracker.log_artifact(out_dir / name)
    metrics = {}
    for m, entry in table["methods"].items():
        for b, c in entry["domains"].items():
            metrics |= {f"avg_at_k/{m}/{b}": c["avg"], f"avg_at_k_ci_lo/{m}/{b}": c["ci"][0],
                        f"avg_at_k_ci_hi/{m}/{b}": c["ci"][1], f"pass_at_k/{m}/{b}": c["pass"]}
        for d, cell in entry["normalized_domains"].items():
            if cell["value"] is not None:
                metrics[f"normalized/{m}/{d}"] = cell["value"]
        if entry["normalized"] is not None:
            metrics[f"normalized/{m}/score"] = entry["normalized"]
        for k, v in (entry["teacher_cost"] or {}).items():
            metrics[f"teacher_cost/{m}/{k}"] = v
        for k, v in (entry["budget"] or {}).items():
            metrics[f"budget/{m}/{k}"] = v
    for d, g in table["teacher_gain"].items():
        if g.get("gain") is not None:
            metrics[f"teacher_gain/{d}"] = g["gain"]
            metrics[f"teacher_gain_significant/{d}"] = float(g["significant"])
    metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
    tracker.log_metrics(metrics)
    return ctx.result(metrics)


def _method_stages(cfg: Config, evaluations: list[str]):
    """(method labels, the stages that made their model: its stage and every stage upstream,
    each once) per evaluation, and a memoised reader of a stage's result metrics."""
    graph = {s.name: s for s in build_graph(cfg)}

    @functools.cache
    def metrics_of(name: str) -> dict[str, float]:  # each stage's result read once, not once per method
        out_dir = cfg.project_dir / graph[name].out_dir
        if not (out_dir / RESULT_FILE).is_file():  # not a declared input: a report fed bare
            return {}                                # evaluations (tests) finds no record there
        return load_result(out_dir).metrics

    out = []
    for ev in evaluations:
        model_stage = graph[ev].kwargs.get("model") if ev in graph else None
        if model_stage is None:
            continue
        seen, todo = [], [model_stage]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.append(name)
                todo += list(graph[name].upstream)
        out.append(([label for label, _ in graph[model_stage].models], [graph[n] for n in seen]))
    return out, metrics_of


def teacher_costs(cfg: Config, evaluations: list[str]) -> dict[str, dict[str, float]]:
    """Method label -> what querying teachers cost to make that model (mopd.teachers.ledger): the
    ledger totals of its stage and of every stage upstream of it (CoPD: all its Phase II stages;
    multi-round MOPD: every round), summed. Methods that never query a teacher are absent."""
    out: dict[str, dict[str, float]] = {}
    methods, metrics_of = _method_stages(cfg, evaluations)
    for labels, stages in methods:
        total = dict.fromkeys(COST_FIELDS, 0.0)
        for spec in stages:
            metrics = metrics_of(spec.name)
            for k in COST_FIELDS:
                total[k] += metrics.get(f"teacher_cost/all/{k}", 0.0)
        if total["requests"] or total["seconds"]:
            tokens = total["student_tokens"]
            total["seconds_per_student_token"] = total["seconds"] / tokens if tokens else None
            for label in labels:
                out[label] = total
    return out


def budgets(cfg: Config, evaluations: list[str]) -> dict[str, dict[str, float]]:
    """Method label -> its student budget (ALGORITHMS §9): the rollouts (and their tokens) sampled
    from a policy being trained, in the stages that integrate the teachers (``integration``:
    every stage that made the model but SFT and the `teacher:*` stages) and with the teachers'
    own GRPO rollouts (``total``). SFT itself samples nothing; a merge integrates for 0."""
    out: dict[str, dict[str, float]] = {}
    methods, metrics_of = _method_stages(cfg, evaluations)
    for labels, stages in methods:
        b = dict.fromkeys(BUDGET_FIELDS, 0.0)
        for spec in stages:
            m = metrics_of(spec.name)
            for what in ("rollouts", "tokens"):
                v = m.get(f"budget/student_{what}", 0.0)
                b[f"total_{what}"] += v
                if spec.kind != "teacher":
                    b[f"integration_{what}"] += v
        for label in labels:
            out[label] = b
    return out


def _normalized_frames(table: dict, domains: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(values with a `note` column saying why a cell is missing, lower bounds, upper bounds)."""
    vals, los, his = {}, {}, {}
    for m, entry in table["methods"].items():
        row, lo, hi, notes = {}, {}, {}, []
        for d in domains:
            cell = entry["normalized_domains"].get(d, {"value": None, "ci": None, "note": "not evaluated"})
            row[d] = math.nan if cell["value"] is None else cell["value"]
            lo[d], hi[d] = cell["ci"] if cell["ci"] else (math.nan, math.nan)
            if cell.get("note"):
                notes.append(f"{d}: {cell['note']}")
        row["score"] = math.nan if entry["normalized"] is None else entry["normalized"]
        lo["score"], hi["score"] = entry["normalized_ci"] or (math.nan, math.nan)
        if entry.get("normalized_note") and not notes:
            notes.append(entry["normalized_note"])
        row["note"] = " | ".join(dict.fromkeys(notes))
        vals[m], los[m], his[m] = row, lo, hi
    return pd.DataFrame(vals).T, pd.DataFrame(los).T, pd.DataFrame(his).T


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("report", run))
