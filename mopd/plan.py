"""What would run and why, before anything runs (like ``terraform plan`` or ``dvc status``).

The record of "already done" is the stage's ``result.json`` in its output folder: it holds the
cache key the outputs were made under, what that key was made of (config sections, upstream
content hashes, code files: :func:`mopd.graph.key_inputs`) and the sha256 of every output file.
:func:`decide` compares it with the key the stage would have now; the Prefect flow calls the same
function when a stage's upstream stages are done, so ``mopd plan`` and the flow cannot disagree
(except that ``plan`` cannot know whether a stage that will rerun reproduces its old outputs
byte for byte: it reports its dependants as ``run``, and the flow may still find them cached).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mopd.artifacts import Result, load_result
from mopd.config import Config
from mopd.graph import StageSpec, build_graph, hash_inputs, key_inputs
from mopd.overrides import overridden


@dataclass(frozen=True)
class Decision:
    stage: str
    action: str  # "run" | "cached"
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def forced(rerun: list[str] | tuple[str, ...], spec: StageSpec) -> bool:
    """``rerun`` names stages (``teacher:math``) or whole kinds (``teacher``, ``distill``)."""
    return spec.name in rerun or spec.kind in rerun


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: value}


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def explain(old: dict[str, Any] | None, new: dict[str, Any], overrides: Iterable[str] = ()) -> list[str]:
    """Why two key inputs differ, in words: config keys (a key set at trigger time is named as
    its ``--set`` override, :mod:`mopd.overrides`), upstream stages, code files."""
    if not old:
        return ["the recorded result has no key inputs (made by an older mopd): key changed"]
    reasons: list[str] = []
    if old.get("domains") != new["domains"]:
        reasons.append(f"domains changed: {old.get('domains')} -> {new['domains']}")
    before, after = _flat(old.get("config", {}), ""), _flat(new["config"], "")
    for key in sorted(set(before) | set(after)):
        if before.get(key, "<unset>") != after.get(key, "<unset>"):
            by = overridden(key, overrides)
            where = key.replace("pipelines:", "pipelines.yaml: ", 1) if key.startswith("pipelines:") \
                else f"params.yaml: {key}" if by is None else f"--set {key}"
            reasons.append(f"config {where}: {_short(before.get(key, '<unset>'))} -> "
                           f"{_short(after.get(key, '<unset>'))}")
    for u in sorted(set(old.get("upstream", {})) | set(new["upstream"])):
        if old.get("upstream", {}).get(u) != new["upstream"].get(u):
            reasons.append(f"upstream {u} changed")
    finished_old, finished_new = old.get("pretrained_teachers", {}), new.get("pretrained_teachers", {})
    for d in sorted(set(finished_old) | set(finished_new)):
        if finished_old.get(d) != finished_new.get(d):
            reasons.append(f"pretrained teacher of {d} changed (its folder's content)")
    code_old, code_new = old.get("code", {}), new["code"]
    for path in sorted(set(code_old) | set(code_new)):
        if path not in code_old:
            reasons.append(f"code {path}: newly imported")
        elif path not in code_new:
            reasons.append(f"code {path}: no longer imported")
        elif code_old[path] != code_new[path]:
            reasons.append(f"code {path}: changed")
    return reasons or ["cache key changed"]


def decide(project: Path, spec: StageSpec, key: str, inputs: dict[str, Any], *,
           force: bool = False, overrides: Iterable[str] = ()) -> tuple[Decision, Result | None]:
    """Whether ``spec`` must run given the key it would have now; returns the decision and, when
    cached, the recorded Result to reuse."""
    if force:
        return Decision(spec.name, "run", ["forced (rerun)"]), None
    try:
        recorded = load_result(project / spec.out_dir)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        missing = isinstance(exc, FileNotFoundError)
        return Decision(spec.name, "run", ["no output yet" if missing else str(exc)]), None
    if recorded.cache_key != key:
        return Decision(spec.name, "run", explain(recorded.inputs, inputs, overrides)), None
    problems = recorded.problems(project)
    if problems:
        return Decision(spec.name, "run", [f"output altered: {p}" for p in problems[:5]]), None
    return Decision(spec.name, "cached", []), recorded


def plan(cfg: Config, rerun: list[str] | tuple[str, ...] = ()) -> list[Decision]:
    """One decision per stage of ``cfg.pipeline``, in topological order."""
    out: list[Decision] = []
    hashes: dict[str, str] = {}
    will_run: set[str] = set()
    for spec in build_graph(cfg):
        pending = [u for u in spec.upstream if u in will_run]
        if pending:
            reasons = [f"upstream {u} will run" for u in pending]
            if forced(rerun, spec):
                reasons.insert(0, "forced (rerun)")
            out.append(Decision(spec.name, "run", reasons))
            will_run.add(spec.name)
            continue
        inputs = key_inputs(cfg, spec, {u: hashes[u] for u in spec.upstream})
        decision, result = decide(cfg.project_dir, spec, hash_inputs(inputs), inputs,
                                  force=forced(rerun, spec), overrides=cfg.overrides)
        out.append(decision)
        if result is None:
            will_run.add(spec.name)
        else:
            hashes[spec.name] = result.content_hash
    return out


def format_plan(decisions: list[Decision]) -> str:
    width = max((len(d.stage) for d in decisions), default=5)
    lines = []
    for d in decisions:
        lines.append(f"{d.stage:<{width}}  {d.action:<6}  {'; '.join(d.reasons)}".rstrip())
    n_run = sum(d.action == "run" for d in decisions)
    lines.append(f"{n_run} to run, {len(decisions) - n_run} cached")
    return "\n".join(lines)
