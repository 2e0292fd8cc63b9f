"""The stage runner: the one way a stage is executed, from DVC (`python -m tasks.<stage>`), Prefect
or a test. (The `mopd` command line is :mod:`mopd.cli`; this is what each stage's command runs.)

`execute` resolves the stage in the pipeline graph, checks its upstream results, computes its cache
key, takes the stage's lock (mopd.stagelock: one run of a stage at a time), opens an MLflow run (a
child of the pipeline's parent run when one is given; mopd.trackstore says what a store failure
does), calls the stage's `run(ctx)` with a :class:`mopd.stage.StageContext` (name, key, a scratch
output folder, upstream outputs by stage and by role, table arguments, tracker), writes
`result.json` (files + sha256 + metrics + cache key) there, last, and swaps the folder in for the
previous outputs (mopd.outputs): a directory without `result.json` is not a finished stage, and
a stage that fails leaves the previous one as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mopd import outputs, placement, runtime, trackstore
from mopd.artifacts import (
    METRICS_FILE,
    MODELS_FILE,
    RecordError,
    Result,
    load_result,
    sha256_file,
    write_result,
    write_run_record,
)
from mopd.config import Config, ConfigError, load_config
from mopd.graph import (
    KINDS,
    build_graph,
    config_sections,
    get_spec,
    hash_inputs,
    key_inputs,
)
from mopd.overrides import parse_set
from mopd.security import redact_secrets
from mopd.snapshots import drop_staged
from mopd.stage import StageContext, project_relative, resolve_roles
from mopd.stagelock import stage_lock
from mopd.tracking import MLflowTracker, NullTracker, default_tracking_uri

log = logging.getLogger("mopd.stage")

EXPERIMENT = os.environ.get("MOPD_EXPERIMENT", "mopd")
# Fault injection for resilience tests and drills: a comma-separated list of stage names that
# raise before doing any work (e.g. MOPD_FAIL_STAGES=teacher:code). Never set in normal runs.
FAIL_ENV = "MOPD_FAIL_STAGES"
# Scheduling drill: stages listed here wait, before doing any work, until the file
# `.mopd/hold/<stage>.release` exists (or MOPD_HOLD_SECONDS pass), so a test can see what the
# orchestrator starts meanwhile. Never set in normal runs.
HOLD_ENV = "MOPD_HOLD_STAGES"
# Fault injection: stages listed here are SIGKILLed after their work, before their record is
# written (the rerun must resume from the in-stage checkpoint). Never set in normal runs.
KILL_ENV = "MOPD_KILL_BEFORE_RECORD"
CONFIG_FILE = "stage_config.json"
RUN_VARYING = {"stage_seconds"}  # in the run record (.mopd/runs) only: never in a file DVC or a cache key hashes

StageFn = Callable[..., Result]


class InjectedFault(RuntimeError):
    pass


def execute(cfg: Config, name: str, run: StageFn, *, parent_run_id: str | None = None,
            track: bool = True) -> Result:
    runtime.die_with_launcher()  # a data-parallel process: killed with the stage, never orphaned
    runtime.die_with_parent()  # a stage process: killed with the command that started it
    spec = get_spec(cfg, name)
    project = cfg.project_dir
    graph = {s.name: s for s in build_graph(cfg)}
    inputs = {u: project / graph[u].out_dir for u in spec.upstream}
    upstream = {u: load_result(path) for u, path in inputs.items()}
    key_in = key_inputs(cfg, spec, {u: r.content_hash for u, r in upstream.items()})
    key = hash_inputs(key_in)

    if name in _names(FAIL_ENV):
        raise InjectedFault(f"stage {name}: failure injected through ${FAIL_ENV}")

    # where this stage's models run (mopd.runtime); a device this host lacks fails here, before
    # the output folder is touched
    rs = cfg.params.runtime
    rt = runtime.resolve(rs.device, rs.dtype, getattr(cfg.params.model_profile, "dtype", None), rs.rollout,
                         rs.gradient_checkpointing, rs.vllm.model_dump(mode="json"))
    runtime.activate(rt)
    runtime.init_distributed()  # under `accelerate launch` (runtime.processes > 1): join the group
    main_proc = runtime.is_main()  # ... where only process 0 writes files, MLflow and result.json
    # one run of a stage at a time (process 0 holds the lock for the data-parallel group)
    with stage_lock(project, name) if main_proc else contextlib.nullcontext(False) as waited:
        if name in _names(HOLD_ENV):  # (holding the stage's lock, as a stage at work does)
            _hold(project, name)
        if waited and runtime.world_size() == 1:
            done = _finished_meanwhile(project, spec.out_dir, key)
            if done is not None:
                log.info("%s: the run that held the lock finished it under the same cache key; not redone", name)
                return done
        return _execute_locked(cfg, spec, run, key=key, key_in=key_in, inputs=inputs, rt=rt,
                               parent_run_id=parent_run_id, track=track and main_proc)


def _finished_meanwhile(project: Path, out_dir: Path, key: str) -> Result | None:
    """The record of a stage another run completed while this one waited for its lock, when it
    was made under ``key`` and its files are intact; else None."""
    try:
        done = load_result(project / out_dir)
    except (FileNotFoundError, RecordError):
        return None
    return done if done.cache_key == key and not done.problems(project) else None


# why: one straight sequence (scratch folder, tracker, run, record, swap, tracker end) that reads
# best in order; its parts are named helpers where they stand alone
def _execute_locked(cfg: Config, spec, run: StageFn, *, key: str, key_in: dict, inputs: dict[str, Path], rt,
                    parent_run_id: str | None, track: bool) -> Result:
    name, project, main_proc = spec.name, cfg.project_dir, runtime.is_main()
    final = project / spec.out_dir
    # Provenance: every output carries the configuration it was made with, so a changed setting
    # changes the stage's content hash (and reruns what depends on it) even when the weights
    # happen to come out identical (e.g. a GRPO run whose groups all had equal rewards).
    sections = redact_secrets(config_sections(cfg, spec))  # no URL credentials in files or MLflow
    tags = {"stage": name, "kind": spec.kind, "pipeline": cfg.pipeline, "cache_key": key,
            **{f"arg/{k}": v for k, v in spec.args}}
    if spec.domain:
        tags["domain"] = spec.domain
    if cfg.overrides:  # settings set at trigger time (already in the params logged below)
        tags["overrides"] = json.dumps(redact_secrets(cfg.overrides), sort_keys=True)[:5000]
    # The tracker first: a store that cannot be reached fails the stage before any work
    # (docs/tracking.md "When the tracking store fails"); later failures are tracking gaps.
    tracker = (MLflowTracker.start(EXPERIMENT, name, tracking_uri=default_tracking_uri(project),
                                   parent_run_id=parent_run_id, tags=tags,
                                   gap_file=project / ".mopd" / trackstore.GAPS_FILE)
               if track else NullTracker())
    # The stage builds in a scratch folder; its previous outputs stay until the new ones are
    # complete and recorded (mopd.outputs).
    out_dir = outputs.begin(final) if main_proc else outputs.building_dir(final)
    runtime.barrier()
    if main_proc:
        (out_dir / CONFIG_FILE).write_text(json.dumps(sections, indent=2, sort_keys=True) + "\n")
        if spec.models:  # what an evaluation of this stage finds in it: method label -> model dir
            (out_dir / MODELS_FILE).write_text(json.dumps(dict(spec.models), indent=2) + "\n")
    tracker.log_params(sections)
    lease = placement.current()
    tracker.set_tags({"torch_threads": _set_threads(), "runtime/device": rt.device, "runtime/dtype": rt.dtype,
                      "runtime/processes": runtime.world_size(),
                      "runtime/devices": ",".join(lease["devices"]) if lease else "-"})
    ctx = StageContext(name=name, key=key, cfg=cfg, out_dir=out_dir, inputs=inputs,
                       roles=resolve_roles(spec.roles, inputs), tracker=tracker, args=spec.kwargs)
    t0 = time.time()
    try:
        result = run(ctx)
    except BaseException:
        tracker.end("FAILED")
        if main_proc:
            outputs.abandon(out_dir)
        raise
    runtime.barrier()  # every process is done with the scratch folder before process 0 swaps it in
    from mopd.data import datasets_read

    for path, domain, split in datasets_read():  # what it trained and was scored on, as MLflow datasets
        tracker.log_dataset(path, f"{domain}-{split}", "eval" if split == "eval" else "training")
    placed = runtime.placements()
    if placed:  # the models the stage actually placed, as device/dtype (+amp for trained ones)
        log.info("%s: models on %s", name, ", ".join(f"{p} x{placed.count(p)}" for p in dict.fromkeys(placed)))
        tracker.set_tags({"runtime/models": ",".join(dict.fromkeys(placed)), "runtime/n_models": len(placed)})
    result = replace(result, stage=name, out_dir=project_relative(final, project),
                     metrics={**result.metrics, "stage_seconds": time.time() - t0},
                     cache_key=key, inputs=key_in, placement=_placement(t0))
    if not main_proc:
        return result
    headline = {k: (v if math.isfinite(v) else None) for k, v in sorted(result.metrics.items())
                if k not in RUN_VARYING}
    (out_dir / METRICS_FILE).write_text(json.dumps(headline, indent=1) + "\n")
    result = replace(result, files={**result.files, METRICS_FILE: sha256_file(out_dir / METRICS_FILE)})
    if name in _names(KILL_ENV):  # fault injection: a kill between the last weights and the record
        os.kill(os.getpid(), signal.SIGKILL)
    # result.json holds what the outputs are, never how this run went: placement and timings go
    # to the run record (.mopd/runs), so DVC's hash of the folder is the same for the same content
    write_result(out_dir, replace(result, placement=None,
                                  metrics={k: v for k, v in result.metrics.items() if k not in RUN_VARYING}))
    outputs.swap_in(out_dir, final)
    write_run_record(project, name, {"stage": name, "cache_key": key, "content_hash": result.content_hash,
                                     "placement": result.placement,
                                     "metrics": {k: v for k, v in result.metrics.items() if k in RUN_VARYING}})
    drop_staged(ctx.checkpoint["checkpoint"])  # in-stage checkpoints only now: the record is in place
    tracker.log_metrics({f"result/{k}": v for k, v in result.metrics.items()})
    tracker.set_tags({"out_dir": result.out_dir, "content_hash": result.content_hash,
                      **{f"sha256/{rel}"[:250]: digest for rel, digest in list(result.files.items())[:50]}})
    tracker.end("FINISHED")
    return result


def _names(env: str) -> set[str]:
    return {s.strip() for s in os.environ.get(env, "").split(",") if s.strip()}


def _placement(started: float) -> dict:
    """Where and when the stage ran: the devices its launcher leased (none on a host without
    devices; on Ray the GPUs Ray gave it), the host, when the lease was taken, when the work
    started and ended; on a cluster engine its name and the node."""
    lease = placement.current() or {}
    return {"devices": lease.get("devices", []), "host": socket.gethostname(),
            "leased_at": lease.get("leased_at"), "started": started, "ended": time.time(),
            "processes": runtime.world_size(),  # of the data-parallel group, and of it on this node:
            "node_processes": int(os.environ.get("LOCAL_WORLD_SIZE") or runtime.world_size()),
            **{k: lease[k] for k in ("engine", "node", "nodes") if k in lease}}  # a cluster engine's: its node(s)


def _hold(project: Path, name: str) -> None:
    release = project / ".mopd" / "hold" / (name.replace(":", "__") + ".release")
    deadline = time.time() + float(os.environ.get("MOPD_HOLD_SECONDS", "300"))
    log.info("%s: held until %s exists (%s)", name, release, HOLD_ENV)
    while not release.exists() and time.time() < deadline:
        time.sleep(0.2)


def _set_threads() -> int:
    """Apply $MOPD_THREADS (the flow sets it per stage; set it yourself for `dvc repro`): floating
    point reductions, hence sampled tokens, depend on the thread count, so a stage's numbers are
    reproducible only for a fixed one. Returns the count in use (recorded on the MLflow run)."""
    import torch

    if os.environ.get("MOPD_THREADS"):
        torch.set_num_threads(int(os.environ["MOPD_THREADS"]))
    return torch.get_num_threads()


@contextlib.contextmanager
def _own_lease(cfg: Config, name: str):
    """A stage started by none of mopd's launchers (``dvc repro`` runs the module itself) leases
    its devices here, before anything touches CUDA; under the flow, `mopd run` / `mopd stage` or
    a data-parallel launcher (its processes share the launcher's lease) it has them already."""
    if placement.current() is not None or "LOCAL_RANK" in os.environ:
        yield
        return
    from mopd.local_run import devices_for

    with placement.leased(devices_for(cfg, get_spec(cfg, name)), name) as lease:
        if lease is not None:
            os.environ.update(lease.env())
        yield


def main(kind: str, run: StageFn, argv: list[str] | None = None) -> int:
    """Command line of every stage module: ``python -m tasks.<kind> [--domain D] [--variant V]
    ...``; the arguments are the kind's, from the stage table (mopd.graph.KINDS)."""
    row = KINDS[kind]
    parser = argparse.ArgumentParser(prog=f"python -m {row.module}", description=run.__doc__)
    parser.add_argument("--project-dir", default=".", help="directory holding params.yaml")
    parser.add_argument("--pipeline", default="full", help="pipeline name in pipelines.yaml")
    for arg in row.args:
        if arg != "pipeline":  # the report's argument is the pipeline itself
            parser.add_argument(f"--{arg}", required=not row.variants,
                                help=f"the stage's {arg} (stage name {kind}:<{arg}>)")
    parser.add_argument("--mlflow-parent", default=None, help="MLflow run id to nest under")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a params.yaml setting for this run (dotted key; repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MOPD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = [getattr(args, a) for a in row.args]
    name = ":".join([kind, *[v for v in values if v]])
    try:
        cfg = load_config(args.project_dir, pipeline=args.pipeline, overrides=parse_set(args.overrides))
        with _own_lease(cfg, name):
            result = execute(cfg, name, run, parent_run_id=args.mlflow_parent, track=not args.no_track)
    except (ConfigError, FileNotFoundError, ValueError, InjectedFault) as exc:
        print(f"error: {name}: {exc}", file=sys.stderr)
        return 2
    except trackstore.TrackingError as exc:  # before any work (docs/tracking.md)
        print(f"error: {name}: {exc}. Nothing was done: the stage's previous outputs and record are "
              f"unchanged.", file=sys.stderr)
        return 2
    if not runtime.is_main():  # one line per stage, from process 0
        return 0
    shown = sorted(result.metrics.items())
    more = f" (+{len(shown) - 12} more metrics in result.json)" if len(shown) > 12 else ""
    print(f"{name}: done -> {result.out_dir} " +
          " ".join(f"{k}={v:.4g}" for k, v in shown[:12]) + more)
    return 0
