"""What a finished pipeline run publishes where practitioners look (issue #28): in MLflow, one
child run per method of the comparison (metrics keyed by benchmark, the method a tag, so the
compare view lines methods up), each method's model registered as ``mopd-<pipeline>-<method>``
(version tags: the stage, its cache key, its content hash and its dvc.lock hash), and the score
table as an MLflow table; for the orchestrator, the score table and the teacher-cost ledger as
rows and markdown (the flow makes them Prefect artifacts).

Torch-free: the flow calls it after its last stage.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

TABLE_FILE = "table.json"  # the report stage's comparison table (tasks.report)


def registered_name(pipeline: str, method: str) -> str:
    """``mopd-<pipeline>-<method>`` with every character MLflow's registry or a URL would
    stumble on (``:``, ``/``, spaces) as ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"mopd-{pipeline}-{method}")


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def score_rows(table: dict) -> list[dict[str, Any]]:
    """One row per (method, benchmark): avg@k and pass@k with their intervals, the method's
    normalised score (MOPD 4.1) where it has one."""
    rows = []
    for m, entry in table["methods"].items():
        for b, c in entry["domains"].items():
            rows.append({"method": m, "benchmark": b, "avg_at_k": _finite(c["avg"]),
                         "ci_lo": _finite(c["ci"][0]), "ci_hi": _finite(c["ci"][1]),
                         "pass_at_k": _finite(c["pass"]), "n_prompts": c.get("n_prompts"),
                         "normalized": _finite(entry.get("normalized"))})
    return rows


def score_markdown(table: dict, pipeline: str) -> str:
    """The comparison as a markdown table: methods by benchmark, avg@k [CI], normalised score."""
    benches = list(dict.fromkeys(b for e in table["methods"].values() for b in e["domains"]))
    level = f"{table.get('level', 0.95):.0%}"
    lines = [f"# {pipeline}: avg@{table.get('k', 'k')} per benchmark ({level} bootstrap CI over prompts)", "",
             "| method | " + " | ".join(benches) + " | normalized |",
             "|---|" + "---|" * (len(benches) + 1)]
    for m, e in table["methods"].items():
        cells = [f"{c['avg']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]" if (c := e["domains"].get(b)) else "—"
                 for b in benches]
        norm = "—" if e.get("normalized") is None else f"{e['normalized']:.3f}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {norm} |")
    for d, g in table.get("teacher_gain", {}).items():
        if g.get("gain") is not None:
            lines.append(f"\nteacher gain on {d}: {g['gain']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
                         f"{'' if g['significant'] else ' (not significant: no normalised score)'}")
    return "\n".join(lines) + "\n"


def cost_markdown(table: dict, pipeline: str) -> str:
    """The teacher-cost ledger and each method's rollout budget (ALGORITHMS §9) as markdown."""
    lines = [f"# {pipeline}: teacher cost and rollout budget per method", "",
             ("| method | teacher requests | teacher seconds | s / student token | integration rollouts "
              "| total rollouts |"), "|---|---|---|---|---|---|"]
    for m, e in table["methods"].items():
        cost, budget = e.get("teacher_cost") or {}, e.get("budget") or {}

        def num(d, k, f="{:,.0f}"):
            v = d.get(k)
            return "—" if v is None else f.format(v)

        lines.append(f"| {m} | {num(cost, 'requests')} | {num(cost, 'seconds', '{:,.1f}')} | "
                     f"{num(cost, 'seconds_per_student_token', '{:.2e}')} | "
                     f"{num(budget, 'integration_rollouts')} | {num(budget, 'total_rollouts')} |")
    return "\n".join(lines) + "\n"


def method_metrics(entry: dict) -> dict[str, float]:
    """One method's metrics keyed by benchmark / domain (no method name in any key)."""
    out: dict[str, Any] = {}
    for b, c in entry["domains"].items():
        out |= {f"avg_at_k/{b}": c["avg"], f"avg_at_k_ci_lo/{b}": c["ci"][0], f"avg_at_k_ci_hi/{b}": c["ci"][1],
                f"pass_at_k/{b}": c["pass"]}
    for d, cell in (entry.get("normalized_domains") or {}).items():
        out[f"normalized/{d}"] = cell.get("value")
    out["normalized/score"] = entry.get("normalized")
    for k, v in (entry.get("teacher_cost") or {}).items():
        out[f"teacher_cost/{k}"] = v
    for k, v in (entry.get("budget") or {}).items():
        out[f"budget/{k}"] = v
    return {k: float(v) for k, v in out.items() if _finite(v) is not None}


def model_folders(project: Path, graph) -> dict[str, tuple[Any, Path]]:
    """method label -> (the stage that made its model, the model folder)."""
    return {label: (spec, project / spec.out_dir / sub) for spec in graph for label, sub in spec.models}


def dvc_lock_hash(project: Path, dvc_stage: str) -> str | None:
    """The md5 dvc.lock records for the stage's output folder (None when not committed)."""
    lock = project / "dvc.lock"
    try:
        stages = yaml.safe_load(lock.read_text()).get("stages", {})
        return str(stages[dvc_stage]["outs"][0]["md5"])
    except (OSError, yaml.YAMLError, AttributeError, KeyError, IndexError, TypeError):
        return None


def publish_methods(parent, project: Path, pipeline: str, graph, results: dict) -> dict[str, str]:
    """One child run per method of the report's table under ``parent`` (its metrics by
    benchmark, tags method/pipeline/stage), the score table as an MLflow table on ``parent``, and
    each method's model registered (a new version only when its content changed). Returns
    {method: registered model name}."""
    from mopd.dvcgen import dvc_name

    report = results.get(f"report:{pipeline}")
    if report is None:
        return {}
    table = json.loads((project / report.out_dir / TABLE_FILE).read_text())
    parent.log_table(score_rows(table), "score_table.json")
    folders = model_folders(project, graph)
    registered = {}
    for m, entry in table["methods"].items():
        spec, folder = folders.get(m, (None, None))
        made = results.get(spec.name) if spec is not None else None
        tags = {"kind": "comparison", "method": m, "pipeline": pipeline}
        if made is not None:  # (`model_stage`: `stage` names a stage's own run)
            tags |= {"model_stage": spec.name, "cache_key": made.cache_key or "", "content_hash": made.content_hash}
        child = parent.child(f"method:{m}", **tags)
        child.log_metrics(method_metrics(entry))
        if made is not None and folder is not None and folder.is_dir():
            name = registered_name(pipeline, m)
            version = child.register_model(name, str(folder.resolve()), {
                **tags, "stage": spec.name, "dvc_lock_md5": dvc_lock_hash(project, dvc_name(spec.name)) or "not in dvc.lock"},
                description=f"method {m} of pipeline {pipeline}: {folder} (stage {spec.name})")
            if version is not None:
                registered[m] = name
        child.end("FINISHED")
    return registered
