"""Run a pipeline in this process's foreground, stage after stage, without Prefect or DVC:
`mopd run [--pipeline P]` and `mopd stage NAME` (debugging one stage by hand, the seeds study).

Each stage runs as the same command line the flow and DVC run (`python -m tasks.<kind> ...`),
and the same decision function decides what is cached (:func:`mopd.plan.decide` on the stage's
`result.json`), so a stage built here is cached for the flow and the other way round.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from mopd.artifacts import load_result
from mopd.cluster import on_cluster, run_on_cluster
from mopd.config import Config
from mopd.graph import StageSpec, build_graph, hash_inputs, key_inputs
from mopd.placement import leased, wanted
from mopd.plan import decide, forced
from mopd.runtime import PARENT_ENV, death_with_parent_preexec, launch_prefix


class StageError(RuntimeError):
    pass


def stage_command(spec: StageSpec, project: Path, pipeline: str, *, track: bool = True,
                  overrides: dict | None = None) -> list[str]:
    """The stage's command line, as the flow, `mopd run` and DVC run it; ``overrides`` (settings
    set at trigger time, mopd.overrides) travel on it as ``--set key=<json>``."""
    from mopd.config import load_config
    from mopd.overrides import to_args

    cfg = load_config(project, pipeline=pipeline, overrides=overrides)
    return [*launcher(cfg, spec, project), spec.module, *spec.argv, "--project-dir", str(project),
            "--pipeline", pipeline, *to_args(overrides or {}), *([] if track else ["--no-track"])]


# A stage is a StageSpec or its kind's StageKind row (`mopd.launch` has only the row): both carry
# `kind`, `tags` and `data_parallel`.
def processes_for(cfg: Config, stage) -> int:
    """The processes the stage runs in: its kind's `runtime.processes` when it runs data-parallel."""
    return cfg.params.runtime.processes_for(stage.kind) if stage.data_parallel else 1


def launcher(cfg: Config, stage, project) -> list[str]:
    """The command prefix that starts the stage's module: `accelerate launch ... -m` or `python -m`."""
    rt = cfg.params.runtime
    return launch_prefix(processes_for(cfg, stage), rt.accelerate_config, project) or [sys.executable, "-m"]


def devices_for(cfg: Config, stage) -> int:
    """Devices the stage's process asks for from the host's inventory (mopd.placement)."""
    return wanted(cfg.params.runtime.devices_per_stage, stage.kind, runs_models="gpu" in stage.tags,
                  processes=processes_for(cfg, stage))


def run_stage(cfg: Config, spec: StageSpec, *, extra_env: dict[str, str] | None = None,
              quiet: bool = False, track: bool = True) -> None:
    """Run one stage's command line, on devices leased for it when the host has any (or as a task
    of the cluster engine `runtime.cluster` names); raises StageError (with the log's tail) if it
    fails."""
    cluster = cfg.params.runtime.cluster
    if on_cluster(cluster):
        env = {**os.environ, **(extra_env or {})}
        rc, tail = run_on_cluster(cluster, stage_command(spec, cfg.project_dir, cfg.pipeline, track=track, overrides=cfg.overrides),
                                  cfg.project_dir, env, kind=spec.kind, gpus=devices_for(cfg, spec), name=spec.name,
                                  module=spec.module, on_line=None if quiet else print)
        if rc != 0:
            raise StageError(f"stage {spec.name} exited with {rc}\n{tail}")
        return
    with leased(devices_for(cfg, spec), spec.name) as lease:
        env = {**os.environ, **(extra_env or {}), **(lease.env() if lease else {})}
        rc, out = run_child(stage_command(spec, cfg.project_dir, cfg.pipeline, track=track, overrides=cfg.overrides),
                            cfg.project_dir, env, quiet)
    if rc != 0:
        tail = "\n".join((out or "").splitlines()[-20:])
        raise StageError(f"stage {spec.name} exited with {rc}\n{tail}")


GRACE = 10.0  # seconds a stage has to end after SIGTERM before its process group is killed


def run_child(cmd: list[str], cwd: Path, env: dict[str, str], quiet: bool = False) -> tuple[int, str | None]:
    """Run a stage's command in its own process group and wait for it: SIGTERM, SIGINT or SIGHUP
    to this process is passed to the whole group (the stage, an `accelerate launch` and its
    workers), which gets GRACE seconds to end before SIGKILL; once it has ended this process exits
    with 128 + the signal. The stage process itself dies with this one even when this one is
    SIGKILLed ($MOPD_PARENT_PID: :func:`mopd.runtime.die_with_parent`): no stage keeps writing
    outputs after the command that started it is gone. Returns (exit status, output if quiet)."""
    import signal

    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, PARENT_ENV: str(os.getpid())}, text=True,
                            stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                            start_new_session=True, preexec_fn=death_with_parent_preexec())
    got: list[int] = []

    def forward(signum, frame):  # only signals: the wait below goes on and reaps the group's leader
        got.append(signum)
        _signal_group(proc.pid, signum)
        timer = threading.Timer(GRACE, _signal_group, (proc.pid, signal.SIGKILL))
        timer.daemon = True
        timer.start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            previous[sig] = signal.signal(sig, forward)
    try:
        out, _ = proc.communicate()
    except BaseException:
        _signal_group(proc.pid, signal.SIGKILL)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if got:
        raise SystemExit(128 + got[0])
    return proc.returncode, out


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):  # the group has ended
        pass


def run_pipeline(cfg: Config, *, rerun: list[str] | tuple[str, ...] = (), quiet: bool = False,
                 extra_env: dict[str, str] | None = None, track: bool = True) -> dict[str, str]:
    """Every stage of ``cfg.pipeline`` in topological order; returns stage -> computed | cached.
    Stops at the first failure (StageError)."""
    status: dict[str, str] = {}
    hashes: dict[str, str] = {}
    graph = build_graph(cfg)
    for i, spec in enumerate(graph, 1):
        inputs = key_inputs(cfg, spec, {u: hashes[u] for u in spec.upstream})
        decision, recorded = decide(cfg.project_dir, spec, hash_inputs(inputs), inputs,
                                    force=forced(rerun, spec))
        if recorded is None:
            t0 = time.time()
            print(f"[{i}/{len(graph)}] {spec.name}: run ({'; '.join(decision.reasons)})", flush=True)
            run_stage(cfg, spec, extra_env=extra_env, quiet=quiet, track=track)
            recorded = load_result(cfg.project_dir / spec.out_dir)
            print(f"[{i}/{len(graph)}] {spec.name}: done in {time.time() - t0:.0f} s", flush=True)
            status[spec.name] = "computed"
        else:
            print(f"[{i}/{len(graph)}] {spec.name}: cached", flush=True)
            status[spec.name] = "cached"
        hashes[spec.name] = recorded.content_hash
    return status


def run_one(cfg: Config, name: str, *, force: bool = False, track: bool = True) -> str:
    """`mopd stage NAME`: stage ``name`` of ``cfg.pipeline`` in this terminal, with the cache
    decision the flow and `mopd run` make; returns "computed" or "cached". Every upstream stage
    must be up to date (a StageError names the first that is not): this runs one stage, not its
    ancestors."""
    graph = build_graph(cfg)
    names = [s.name for s in graph]
    if name not in names:
        raise StageError(f"no stage {name!r} in pipeline {cfg.pipeline!r}; its stages: {names}")
    hashes: dict[str, str] = {}
    for spec in graph:
        missing = [u for u in spec.upstream if u not in hashes]
        if spec.name == name and missing:
            raise StageError(f"stage {name!r} needs {missing}, which are not up to date in {cfg.project_dir}: "
                             f"run them first (mopd stage {missing[0]} --pipeline {cfg.pipeline}, or mopd run "
                             f"--pipeline {cfg.pipeline})")
        if missing:
            continue  # an ancestor of a stale stage: it cannot be keyed, and is not up to date either
        inputs = key_inputs(cfg, spec, {u: hashes[u] for u in spec.upstream})
        target = spec.name == name
        decision, recorded = decide(cfg.project_dir, spec, hash_inputs(inputs), inputs, force=force and target)
        if not target:
            if recorded is not None:
                hashes[spec.name] = recorded.content_hash
            continue
        if recorded is not None:
            print(f"{name}: cached ({spec.out_dir}/result.json matches its cache key; --force runs it again)",
                  flush=True)
            return "cached"
        print(f"{name}: run ({'; '.join(decision.reasons)})", flush=True)
        t0 = time.time()
        run_stage(cfg, spec, track=track)
        print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)
        return "computed"
    raise AssertionError("unreachable: the stage is in the graph")
