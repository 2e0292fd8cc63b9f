"""The pipeline DAG, defined once.

Prefect (``flows/``), the stage command lines (``tasks/``) and the test that checks ``dvc.yaml``
all read the graph from here, so the two orchestrators cannot drift apart: same stage names, same
output directories, same ``params.yaml`` keys, same upstream edges.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mopd.config import Config, section

ARTIFACTS = "artifacts"


@dataclass(frozen=True)
class StageSpec:
    name: str  # "teacher:math"
    module: str  # "tasks.teacher"
    out_dir: str  # relative to the project dir: "artifacts/teachers/math"
    params_keys: tuple[str, ...]  # dotted keys of params.yaml this stage reads
    pipeline_keys: tuple[str, ...] = ()  # dotted keys of pipelines.yaml this stage reads
    upstream: tuple[str, ...] = ()
    domain: str | None = None
    tags: tuple[str, ...] = ()

    @property
    def argv(self) -> list[str]:
        """The command line arguments of ``python -m <module>`` (the same as dvc.yaml's cmd)."""
        return ["--domain", self.domain] if self.domain else []


def build_graph(cfg: Config) -> list[StageSpec]:
    """The stages of ``cfg.pipeline`` in a topological order (teachers adjacent, parallel)."""
    wanted = set(cfg.pipe.stages)
    domains = cfg.domains
    local = cfg.local_teacher_domains if "teacher" in wanted else []
    teachers = [f"teacher:{d}" for d in local]
    specs: list[StageSpec] = []

    def add(name: str, **kw: Any) -> None:
        if name.split(":")[0] in wanted:
            specs.append(StageSpec(name=name, **kw))

    add("data", module="tasks.data", out_dir=f"{ARTIFACTS}/data", params_keys=("seed", "data"),
        pipeline_keys=tuple(f"domains.{d}.{k}" for d in domains for k in ("verifier", "data")))
    add("base", module="tasks.base", out_dir=f"{ARTIFACTS}/base",
        params_keys=("seed", "profile", "profiles"), upstream=("data",))
    add("sft", module="tasks.sft", out_dir=f"{ARTIFACTS}/sft", params_keys=("seed", "sft"),
        upstream=("data", "base"), tags=("gpu",))
    for d in local:
        add(f"teacher:{d}", module="tasks.teacher", out_dir=f"{ARTIFACTS}/teachers/{d}",
            params_keys=("seed", f"teacher.{d}"), pipeline_keys=(f"domains.{d}.verifier",),
            upstream=("data", "sft"), domain=d, tags=("gpu", "teacher"))
    # Uni-OPD A.1: difficulty is scored with the student, so it needs only data + SFT and runs
    # beside the teachers; distillation then trains on its balanced prompt set.
    add("difficulty", module="tasks.difficulty", out_dir=f"{ARTIFACTS}/difficulty",
        params_keys=("seed", "difficulty"), upstream=("data", "sft"), tags=("gpu",))
    balanced = ("difficulty",) if "difficulty" in wanted else ()
    # The routing table is part of what distill reads: new endpoints or model names rerun it.
    add("distill", module="tasks.distill", out_dir=f"{ARTIFACTS}/distill",
        params_keys=("seed", "distill"), pipeline_keys=tuple(f"domains.{d}.teacher" for d in domains),
        upstream=("data", "sft", *balanced, *teachers), tags=("gpu",))
    add("merge", module="tasks.merge", out_dir=f"{ARTIFACTS}/merge", params_keys=("merge",),
        upstream=("sft", *teachers))
    models = [s.name for s in specs if s.name in ("sft", "distill", "merge")] + teachers
    add("evaluate", module="tasks.evaluate", out_dir=f"{ARTIFACTS}/evaluate",
        params_keys=("seed", "evaluate"), upstream=("data", *models), tags=("gpu",))

    names = {s.name for s in specs}
    for s in specs:
        missing = [u for u in s.upstream if u not in names]
        if missing:
            raise ValueError(
                f"pipelines.{cfg.pipeline}.stages: stage {s.name!r} needs {missing}, "
                f"which the pipeline does not run"
            )
    return specs


def levels(specs: list[StageSpec]) -> list[list[StageSpec]]:
    """Group stages into waves whose members depend only on earlier waves (run a wave in parallel)."""
    depth: dict[str, int] = {}
    for s in specs:  # specs are topologically ordered
        depth[s.name] = 1 + max((depth[u] for u in s.upstream), default=-1)
    out: list[list[StageSpec]] = [[] for _ in range(max(depth.values()) + 1)]
    for s in specs:
        out[depth[s.name]].append(s)
    return out


def get_spec(cfg: Config, name: str) -> StageSpec:
    for s in build_graph(cfg):
        if s.name == name:
            return s
    raise ValueError(f"no stage {name!r} in pipeline {cfg.pipeline!r}")


def config_sections(cfg: Config, spec: StageSpec) -> dict[str, Any]:
    """The exact configuration a stage reads: its params.yaml and pipelines.yaml keys."""
    out: dict[str, Any] = {k: section(cfg.params, k) for k in spec.params_keys}
    pipes = cfg.pipelines.model_dump(mode="json")
    for k in spec.pipeline_keys:
        node: Any = pipes
        for part in k.split("."):
            node = node[part]
        out[f"pipelines:{k}"] = node
    return out


def code_version(module: str) -> str:
    """sha256 over the stage module, the stage runner and the library's Python sources: the code
    a stage runs (wherever the packages are imported from)."""
    import importlib.util

    import mopd

    h = hashlib.sha256()
    stage_file = Path(importlib.util.find_spec(module).origin)
    files = [stage_file, stage_file.parent / "cli.py", *sorted(Path(mopd.__file__).parent.rglob("*.py"))]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(cfg: Config, spec: StageSpec, upstream_hashes: dict[str, str]) -> str:
    """Stage inputs + its config sections + upstream content hashes + code version."""
    payload = {
        "stage": spec.name,
        "pipeline": cfg.pipeline,
        "config": config_sections(cfg, spec),
        "upstream": {u: upstream_hashes[u] for u in spec.upstream},
        "code": code_version(spec.module),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
