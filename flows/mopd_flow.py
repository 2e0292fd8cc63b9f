"""Prefect flow `mopd`: the post-training DAG, stage by stage, cached and resumable.

Each stage is a Prefect task that runs the stage's command line (`python -m tasks.<stage>`, the
same command DVC runs) in a subprocess: stages are isolated (memory, RNG, a crash), and this
module never imports torch. Waves of independent stages run in parallel (the teachers fan out),
tagged `gpu` for the server-side concurrency limit.

Caching: results persist in Prefect's local result storage (`$PREFECT_HOME/storage`; the
Makefile points PREFECT_HOME at `.mopd/prefect` inside the project). The task's cache key is `mopd.graph.cache_key` (the stage's config sections + its
upstream content hashes + the code version); the persisted result is the stage's small JSON
Result (paths + sha256), never weights. A cache hit whose files are missing or changed is rerun.
The `rerun` parameter forces named stages (`teacher:math`, or `teacher` for all teachers); a
failed teacher does not stop the others, and the next run recomputes only what failed and what
depends on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.dvc_sync import sync_lock
from mopd.artifacts import Result, load_result
from mopd.config import load_config
from mopd.graph import StageSpec, build_graph, cache_key, levels

EXPERIMENT = os.environ.get("MOPD_EXPERIMENT", "mopd")
SUMMARY_FILE = ".mopd/last_run.json"
PROGRESS_EVERY = 10.0  # seconds between forwarded progress-bar lines


class StageFailed(RuntimeError):
    pass


def _key_from_parameters(context, parameters) -> str:
    return parameters["key"]


@task(cache_key_fn=_key_from_parameters, persist_result=True, result_serializer="json",
      cache_expiration=None)
def stage(name: str, key: str, module: str, argv: list[str], out_dir: str, project_dir: str,
          pipeline: str, parent_run_id: str | None, threads: int) -> dict:
    """Run one stage's command line; return its Result as a dict (what Prefect caches)."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", module, *argv, "--project-dir", project_dir, "--pipeline", pipeline]
    if parent_run_id:
        cmd += ["--mlflow-parent", parent_run_id]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "MOPD_THREADS": str(threads)}
    logger.info("%s: %s", name, " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=project_dir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: list[str] = []
    last_bar = 0.0
    for line in proc.stdout:  # stream the stage's own log into Prefect's
        line = line.rstrip()
        if not line:
            continue
        tail = (tail + [line])[-15:]
        if "%|" in line:  # a progress-bar refresh: forward one every PROGRESS_EVERY seconds
            if time.monotonic() - last_bar < PROGRESS_EVERY:
                continue
            last_bar = time.monotonic()
        logger.info("[%s] %s", name, line[-2000:])
    if proc.wait() != 0:
        raise StageFailed(f"stage {name} exited with {proc.returncode}:\n" + "\n".join(tail))
    result = load_result(Path(project_dir) / out_dir)
    if result.cache_key != key:
        raise StageFailed(f"stage {name}: result.json has cache key {result.cache_key}, expected {key}")
    return result.to_dict()


def _threads(parallel: int) -> int:
    """torch threads per stage: $MOPD_THREADS when set (results are reproducible across Prefect
    and DVC only for a fixed thread count), else the cores shared by the stages running at once."""
    fixed = os.environ.get("MOPD_THREADS")
    return int(fixed) if fixed else max(1, (os.cpu_count() or 1) // max(1, parallel))


def _forced(rerun: list[str], spec: StageSpec) -> bool:
    return spec.name in rerun or spec.name.split(":")[0] in rerun


@flow(name="mopd", log_prints=True)
def mopd(pipeline: str = "full", rerun: list[str] | None = None, project_dir: str | None = None
         ) -> dict:
    """Run pipeline `pipeline` of pipelines.yaml; returns {"status": stage -> computed | cached |
    failed | skipped, "parent_run_id": MLflow parent run}."""
    logger = get_run_logger()
    project = Path(project_dir or os.environ.get("MOPD_PROJECT_DIR", ".")).resolve()
    cfg = load_config(project, pipeline=pipeline)  # any config error fails here, before work
    graph = build_graph(cfg)
    rerun = list(rerun or [])
    known = {s.name for s in graph} | {s.name.split(":")[0] for s in graph}
    unknown = [r for r in rerun if r not in known]
    if unknown:
        raise ValueError(f"rerun: unknown stage(s) {unknown}; stages: {sorted(known)}")

    from mopd.tracking import MLflowTracker, default_tracking_uri

    parent = MLflowTracker.start(EXPERIMENT, f"mopd-{pipeline}", tracking_uri=default_tracking_uri(project),
                                 tags={"pipeline": pipeline, "kind": "pipeline"})
    parent.log_params({"pipeline": pipeline, "rerun": ",".join(rerun), "profile": cfg.params.profile})
    results: dict[str, Result] = {}
    status: dict[str, str] = {}
    try:
        for wave in levels(graph):
            ready = [s for s in wave if all(u in results for u in s.upstream)]
            status |= {s.name: "skipped" for s in wave if s not in ready}
            threads = _threads(len(ready))
            submit = partial(_submit, cfg=cfg, project=project, results=results,
                             parent_run_id=parent.run_id, threads=threads)
            futures = {s.name: submit(s, refresh=_forced(rerun, s)) for s in ready}
            for spec in ready:
                status[spec.name], res = _settle(spec, futures[spec.name], submit, project, logger)
                if res is not None:
                    results[spec.name] = res
                if status[spec.name] == "cached":
                    _log_cached(parent, spec, res)
    except BaseException:
        parent.end("FAILED")
        raise

    summary = {"status": status, "parent_run_id": parent.run_id,
               "dvc": sync_lock(project, pipeline, list(results))}
    logger.info("dvc.lock: %s", summary["dvc"])
    _finish(parent, project, results, summary)
    failed = [k for k, v in status.items() if v == "failed"]
    if failed:
        raise StageFailed(f"stage(s) failed: {failed}; skipped: "
                          f"{[k for k, v in status.items() if v == 'skipped']}. Run again to resume.")
    return summary


def _settle(spec: StageSpec, fut, submit, project: Path, logger) -> tuple[str, Result | None]:
    """Wait for a stage; a cache hit whose files are missing or changed is recomputed.
    Returns (computed | cached | failed, Result or None)."""
    state = fut.wait() or fut.state
    cached = state.name == "Cached"
    if state.is_completed() and cached:
        problems = Result.from_dict(state.result()).problems(project)
        if problems:
            logger.warning("%s: cached result is stale (%s); recomputing", spec.name, problems[0])
            fut = submit(spec, refresh=True)
            state, cached = fut.wait() or fut.state, False
    if not state.is_completed():
        logger.error("%s failed: %s", spec.name, state.message)
        return "failed", None
    return ("cached" if cached else "computed"), Result.from_dict(state.result())


def _submit(spec: StageSpec, *, cfg, project: Path, results: dict[str, Result], parent_run_id: str,
            threads: int, refresh: bool):
    key = cache_key(cfg, spec, {u: results[u].content_hash for u in spec.upstream})
    task_ = stage.with_options(name=f"stage-{spec.name.split(':')[0]}", task_run_name=spec.name,
                               tags=list(spec.tags), refresh_cache=refresh)
    return task_.submit(name=spec.name, key=key, module=spec.module, argv=spec.argv,
                        out_dir=spec.out_dir,
                        project_dir=str(project), pipeline=cfg.pipeline,
                        parent_run_id=parent_run_id, threads=threads)


def _log_cached(parent, spec: StageSpec, res: Result) -> None:
    """A child run for a cache hit too, so every pipeline run shows every stage in MLflow."""
    child = parent.child(spec.name, stage=spec.name, cache="hit", cache_key=res.cache_key or "")
    child.log_metrics({f"result/{k}": v for k, v in res.metrics.items()})
    child.end("FINISHED")


def _finish(parent, project: Path, results: dict[str, Result], summary: dict) -> None:
    (project / SUMMARY_FILE).parent.mkdir(parents=True, exist_ok=True)
    (project / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    parent.set_tags({f"stage/{k}": v for k, v in summary["status"].items()})
    if "evaluate" in results:
        ev = project / results["evaluate"].out_dir
        for name in ("avg_at_k.csv", "normalized.csv", "avg_at_k.png", "normalized.png"):
            if (ev / name).is_file():
                parent.log_artifact(ev / name)
        parent.log_metrics({k: v for k, v in results["evaluate"].metrics.items()
                            if k.startswith("normalized/")})
    parent.end("FAILED" if "failed" in summary["status"].values() else "FINISHED")


if __name__ == "__main__":
    print(json.dumps(mopd(*sys.argv[1:2]), indent=2))
