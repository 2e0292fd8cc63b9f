"""Prefect flow `mopd`: one pipeline of the stage table, stage by stage, cached and resumable.

Each stage is a Prefect task that runs the stage's command line (`python -m tasks.<kind> ...`, the
same command DVC runs) in a subprocess: stages are isolated (memory, RNG, a crash), and this
module never imports torch. Every stage is submitted at once with its upstream stages' futures
as inputs, so it starts as soon as *its own* upstream stages are done (no waves); the `gpu` tag
keeps the server-side concurrency limit on training stages.

Caching: the record of "done" is each stage's `result.json` (cache key, what the key was made of,
sha256 of every output). When a stage's upstream stages are done, the task computes the stage's
key (`mopd.graph.key_inputs`: config sections + upstream content hashes + its own code files,
never the pipeline) and asks `mopd.plan.decide` — the function `mopd plan` uses — whether the
recorded outputs still match: if so the stage is a cache hit (the task ends in a `Cached` state,
no subprocess), else it runs. So two pipelines that share stages share their outputs, a
`dvc repro` counts as done, and a changed or deleted output is recomputed. `rerun` forces named
stages (`teacher:math`) or kinds (`teacher`); a failed stage stops only what depends on it, and
the next run recomputes only what failed and what depends on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dvc_sync import sync_lock, to_record
from flows.prefect_report import (
    PROGRESS_EVERY,
    StageProgress,
    WaitState,
    comparison_artifacts,
)
from mopd.artifacts import Result, load_result
from mopd.cluster import on_cluster, run_on_cluster
from mopd.config import load_config
from mopd.graph import (
    StageSpec,
    build_graph,
    hash_inputs,
    levels,
    outside_project,
    static_key_inputs,
    with_upstream,
)
from mopd.local_run import devices_for, stage_command
from mopd.overrides import flatten
from mopd.placement import acquire, inventory
from mopd.plan import decide, forced
from mopd.progress import ENV as PROGRESS_ENV
from mopd.progress import RunBoard
from mopd.publish import (
    TABLE_FILE,
    publish_methods,
)
from mopd.runtime import PARENT_ENV, death_with_parent_preexec
from mopd.security import allowed_project_dir, redact_secrets

EXPERIMENT = os.environ.get("MOPD_EXPERIMENT", "mopd")
SUMMARY_FILE = ".mopd/last_run.json"
# Tasks wait for their upstream futures inside the runner's threads: one thread per stage.
MAX_STAGES = 256
# Stage processes running at once in one flow run (besides the server-side `gpu` tag limit):
# several torch processes on a small CPU host only slow each other down.
PARALLEL_ENV = "MOPD_MAX_PARALLEL"


def max_parallel() -> int:
    """Stage processes run at once per flow run: $MOPD_MAX_PARALLEL, else half the cores (at least
    one), so each stage keeps two torch threads. Measured on 2 cores (`make demo`, cold `full`):
    one stage at a time took 812 s of pipeline, two at a time with one thread each 987 s."""
    return int(os.environ.get(PARALLEL_ENV) or max(1, (os.cpu_count() or 1) // 2))


class _PriorityGate:
    """At most ``slots`` holders; when a slot frees, the waiting stage earliest in the graph's
    topological order gets it (teachers before the evaluations that could run beside them), not
    whichever thread the OS wakes first."""

    def __init__(self, slots: int):
        self._free = slots
        self._waiting: list[int] = []
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, priority: int, on_wait=None):
        """A slot for the block; ``on_wait`` is called once if the slot is not free at once."""
        with self._cond:
            self._waiting.append(priority)
            while not (self._free > 0 and min(self._waiting) == priority):
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                self._cond.wait()
            self._waiting.remove(priority)
            self._free -= 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()


class _RunState:
    """What the stage tasks of one flow run share (they run in this process's threads)."""

    def __init__(self, board: RunBoard, slots: int, order: dict[str, int], devices: list[str], cluster=None):
        self.board = board
        self.cluster = cluster  # runtime.cluster: on a cluster engine, the engine places the stages
        self.gate = _PriorityGate(slots)
        self.order = order
        self.devices = devices  # the host's inventory (mopd.placement), read once per run
        self.device_turn = _PriorityGate(1)  # one stage at a time takes devices, in graph order

    @contextlib.contextmanager
    def slot(self, name: str, devices: int, on_wait=None):
        """Where stage ``name`` may run: a stage that runs models on a host with devices waits for
        ``devices`` of them (leased host-wide: other flows, `mopd run`, `mopd stage` and
        `dvc repro` share them) and yields the lease; every other stage takes one of the run's
        process slots (MOPD_MAX_PARALLEL) and yields None. On a cluster engine (Ray) its scheduler
        admits and places every stage: nothing is taken here. ``on_wait``: called once when the
        stage has to wait."""
        waited = _Once(on_wait)
        if on_cluster(self.cluster):
            yield None
        elif devices and self.devices:
            with self.device_turn.hold(self.order[name], waited):
                lease = acquire(devices, name, devices=self.devices, on_wait=waited)
            try:
                yield lease
            finally:
                lease.release()
        else:
            with self.gate.hold(self.order[name], waited):
                yield None


class _Once:
    """Call ``fn`` the first time only (None: never)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


_RUNS: dict[str, _RunState] = {}


class StageFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class StageCall:
    """What every stage task of one flow run shares: where it runs (project, pipeline), the
    settings set at trigger time (mopd.overrides: they travel on each stage's command line), the
    MLflow parent run and the run's board (the key of its `_RunState`)."""

    project_dir: str
    pipeline: str
    parent_run_id: str | None
    board_id: str
    overrides: dict = field(default_factory=dict)


@task(cache_policy=NO_CACHE, persist_result=False)
def stage(spec: StageSpec, base_inputs: dict, upstream: dict[str, dict], call: StageCall, force: bool,
          threads: int, devices: int = 0) -> dict:
    """Decide (cached or run) once the upstream stages are done; run the stage's command line
    when needed. Returns {"result": Result dict, "action": "cached" | "computed", "reasons"}."""
    logger = get_run_logger()
    name, project = spec.name, Path(call.project_dir)
    run = _RUNS.get(call.board_id)
    board = run.board if run else None
    inputs = with_upstream(base_inputs, spec, {u: Result.from_dict(r["result"]).content_hash
                                               for u, r in upstream.items()})
    key = hash_inputs(inputs)
    decision, recorded = decide(project, spec, key, inputs, force=force, overrides=call.overrides)
    if recorded is not None:
        board and board.stage(name, "cached")
        return Completed(name="Cached", message=f"{name}: outputs match cache key {key[:12]}",
                         data={"result": recorded.to_dict(), "action": "cached", "reasons": []})
    logger.info("%s: to run (%s)", name, "; ".join(decision.reasons))
    shown = WaitState(logger)
    try:
        with run.slot(name, devices, shown.wait) if run else contextlib.nullcontext() as lease:
            shown.resume()
            board and board.stage(name, "running")
            result = _run_stage(spec, key, call, threads, board, logger, lease.env() if lease else {},
                                (run.cluster, devices) if run else None)
    except BaseException:
        board and board.stage(name, "failed")
        raise
    board and board.stage(name, "done")
    return {"result": result.to_dict(), "action": "computed", "reasons": decision.reasons}


def _run_stage(spec: StageSpec, key: str, call: StageCall, threads: int, board: RunBoard | None, logger,
               placed: dict[str, str], cluster=None) -> Result:
    name, project, parent_run_id = spec.name, Path(call.project_dir), call.parent_run_id
    cmd = stage_command(spec, project, call.pipeline, overrides=call.overrides)
    if parent_run_id:
        cmd += ["--mlflow-parent", parent_run_id]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "MOPD_THREADS": str(threads), **placed}
    if placed:
        logger.info("%s: on devices %s", name, placed["CUDA_VISIBLE_DEVICES"])
    if board:
        env[PROGRESS_ENV] = str(board.progress_file(name))
    logger.info("%s: %s", name, " ".join(cmd))
    with StageProgress(name, board.progress_file(name) if board else None, logger):
        return _launch(spec, key, cmd, project, env, logger, cluster)


# why: 7 parameters: the stage and its key (to check its record), the command and where it runs
# (project, environment), what reports on it (logger), the cluster engine, if any
def _launch(spec: StageSpec, key: str, cmd: list[str], project: Path, env: dict, logger, cluster) -> Result:
    name = spec.name
    if cluster is not None and on_cluster(cluster[0]):  # a Ray task on a node with what it asks for
        rc, tail = run_on_cluster(cluster[0], cmd, project, env, kind=spec.kind, gpus=cluster[1], name=name,
                                  module=spec.module, on_line=lambda line: line.strip() and logger.info("[%s] %s", name, line[-2000:]))
        if rc != 0:
            raise StageFailed(f"stage {name} exited with {rc}:\n{tail}")
        return _checked_result(project, spec, key)
    # the stage dies with this process (mopd.runtime.die_with_parent; the preexec for a launcher
    # such as `accelerate launch`, which runs no mopd code): a killed or cancelled flow run leaves
    # no stage writing outputs
    proc = subprocess.Popen(cmd, cwd=project, env={**env, PARENT_ENV: str(os.getpid())}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            preexec_fn=death_with_parent_preexec())
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
    return _checked_result(project, spec, key)


def _checked_result(project: Path, spec: StageSpec, key: str) -> Result:
    result = load_result(project / spec.out_dir)
    if result.cache_key != key:
        raise StageFailed(f"stage {spec.name}: result.json has cache key {result.cache_key}, expected {key} "
                          "(did the configuration or code change while the flow ran?)")
    return result


def _threads(parallel: int) -> int:
    """torch threads per stage: $MOPD_THREADS when set (results are reproducible across Prefect
    and DVC only for a fixed thread count), else the cores shared by the stages that can run at
    once: those of the same depth in the graph, at most `max_parallel()` (deterministic for a
    given pipeline and machine)."""
    fixed = os.environ.get("MOPD_THREADS")
    parallel = min(parallel, max_parallel())
    return int(fixed) if fixed else max(1, (os.cpu_count() or 1) // max(1, parallel))


@flow(name="mopd", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=MAX_STAGES))
def mopd(pipeline: str = "full", rerun: list[str] | None = None, project_dir: str | None = None,
         params: dict | None = None) -> dict:
    """Run pipeline `pipeline` of pipelines.yaml; returns {"status": stage -> computed | cached |
    failed | skipped, "parent_run_id": MLflow parent run}. `params`: params.yaml settings for this
    run only, nested like the file (`{"distill": {"learning_rate": 1e-4}}`), validated like it and
    part of each stage's cache key (mopd.overrides)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    # project_dir is a deployment parameter any API client can set: keep it inside the roots
    # this worker allows (MOPD_PROJECT_ROOTS, default the directory it was started in).
    project = allowed_project_dir(project_dir or os.environ.get("MOPD_PROJECT_DIR", "."))
    overrides = flatten(params or {})
    cfg = load_config(project, pipeline=pipeline, overrides=overrides)  # any config error fails here, before work
    devices = inventory()  # a malformed $MOPD_DEVICES fails here too
    graph = build_graph(cfg)
    if len(graph) > MAX_STAGES:
        raise ValueError(f"pipeline {pipeline!r} has {len(graph)} stages; the flow runs at most {MAX_STAGES}")
    rerun = list(rerun or [])
    known = {s.name for s in graph} | {s.kind for s in graph}
    unknown = [r for r in rerun if r not in known]
    if unknown:
        raise ValueError(f"rerun: unknown stage(s) {unknown}; stages: {sorted(known)}")

    from mopd.tracking import MLflowTracker, default_tracking_uri
    from mopd.trackstore import GAPS_FILE

    # a store that cannot be reached fails the run before any stage; later, a tracking gap
    # (mopd.trackstore): the stages' work goes on
    parent = MLflowTracker.start(EXPERIMENT, f"mopd-{pipeline}", tracking_uri=default_tracking_uri(project),
                                 tags={"pipeline": pipeline, "kind": "pipeline"},
                                 gap_file=project / ".mopd" / GAPS_FILE)
    parent.log_params({"pipeline": pipeline, "rerun": ",".join(rerun), "profile": cfg.params.profile,
                       **{f"override/{k}": v for k, v in redact_secrets(overrides).items()}})
    run_id = str(flow_run.get_id() or parent.run_id)
    board = RunBoard(project, run_id, pipeline, [s.name for s in graph])
    _RUNS[run_id] = _RunState(board, max_parallel(), {s.name: i for i, s in enumerate(graph)}, devices,
                              cfg.params.runtime.cluster)
    width = {s.name: len(level) for level in levels(graph) for s in level}
    futures = {}
    call = StageCall(str(project), pipeline, parent.run_id, run_id, overrides)
    try:
        for spec in graph:
            task_ = stage.with_options(task_run_name=spec.name, tags=list(spec.tags))
            futures[spec.name] = task_.submit(
                spec=spec, base_inputs=static_key_inputs(cfg, spec),
                upstream={u: futures[u] for u in spec.upstream}, call=call, force=forced(rerun, spec),
                threads=_threads(width[spec.name]), devices=devices_for(cfg, spec))
        status, results = _settle(graph, futures, board, parent, logger)
    except BaseException:
        board.finish("failed")
        parent.end("FAILED")
        _RUNS.pop(run_id, None)
        raise

    # Stages computed by this run and what depends on them; other cached ones were recorded by the
    # run (or `dvc repro`) that made them, and `dvc commit` rehashes every output it is given.
    in_project = not outside_project(cfg)
    summary = {"status": status, "parent_run_id": parent.run_id, "pipeline": pipeline,
               "dvc": sync_lock(project, to_record(graph, status)) if in_project
               else "skipped (storage.artifacts is outside the project)"}
    logger.info("dvc.lock: %s", summary["dvc"])
    _finish(parent, project, pipeline, results, summary, graph)
    failed = [k for k, v in status.items() if v == "failed"]
    board.finish("failed" if failed else "completed")
    _RUNS.pop(run_id, None)
    if failed:
        raise StageFailed(f"stage(s) failed: {failed}; skipped: "
                          f"{[k for k, v in status.items() if v == 'skipped']}. Run again to resume.")
    return summary


def _settle(graph: list[StageSpec], futures: dict, board: RunBoard, parent, logger
            ) -> tuple[dict[str, str], dict[str, Result]]:
    """Wait for every stage; (stage -> computed | cached | failed | skipped, completed Results)."""
    status: dict[str, str] = {}
    results: dict[str, Result] = {}
    for spec in graph:
        fut = futures[spec.name]
        fut.wait()
        state = fut.state
        if state.is_completed():
            out = state.result()
            status[spec.name] = out["action"]
            results[spec.name] = res = Result.from_dict(out["result"])
            if out["action"] == "cached":
                _log_cached(parent, spec, res)
        elif state.is_failed() or state.is_crashed():
            status[spec.name] = "failed"
            logger.error("%s failed: %s", spec.name, state.message)
        else:  # an upstream stage failed: this one never started
            status[spec.name] = "skipped"
            board.stage(spec.name, "skipped")
    return status, results


def _log_cached(parent, spec: StageSpec, res: Result) -> None:
    """A child run for a cache hit too, so every pipeline run shows every stage in MLflow."""
    child = parent.child(spec.name, stage=spec.name, kind=spec.kind, cache="hit",
                         cache_key=res.cache_key or "")
    child.log_metrics({f"result/{k}": v for k, v in res.metrics.items()})
    child.end("FINISHED")


def _finish(parent, project: Path, pipeline: str, results: dict[str, Result], summary: dict, graph) -> None:
    parent.set_tags({f"stage/{k}": v for k, v in summary["status"].items()})
    report = results.get(f"report:{pipeline}")
    if report is not None:
        out = project / report.out_dir
        for name in ("avg_at_k.csv", "normalized.csv", "avg_at_k.png", "normalized.png"):
            if (out / name).is_file():
                parent.log_artifact(out / name)
        # the parent's metrics name no method: each method is a child run (mopd.publish), so
        # MLflow's compare view puts methods side by side on the same keys
        parent.log_metrics({k: v for k, v in report.metrics.items() if k.startswith("teacher_gain")})
        try:  # what is published about finished work never fails the run that did the work
            summary["registered"] = publish_methods(parent, project, pipeline, graph, results)
            comparison_artifacts(project / report.out_dir / TABLE_FILE, pipeline)
        except Exception as exc:  # noqa: BLE001  (logged and recorded in the run's summary)
            get_run_logger().warning("publishing the comparison failed: %s", exc)
            summary["publish_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    (project / SUMMARY_FILE).parent.mkdir(parents=True, exist_ok=True)
    (project / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    parent.end("FAILED" if "failed" in summary["status"].values() else "FINISHED")
