"""Stages on a cluster engine (`runtime.cluster`; torch-free: the flow imports it).

``engine: local`` (the default) runs each stage's command line as a subprocess of the launcher, on
devices leased from this host (mopd.placement). ``engine: ray`` runs it as a Ray task on a node
that has what the stage asks for — ``num_gpus`` = its device count (mopd.placement.wanted),
``num_cpus`` and custom resources per stage kind (``runtime.cluster.resources``, e.g. the
teachers on a ``teacher_pool``) — so Ray's scheduler, not mopd, decides the node and its GPUs
(Ray sets ``CUDA_VISIBLE_DEVICES`` in the task). The same command line, cache decision and
result run there: the stage records the Ray node it ran on (``placement.node``) in its
``result.json``. The command's working directory, Python and project files must be the same
path on every node (one image, a shared filesystem).

The flow (`flows.mopd_flow`) and `mopd run` / `mopd stage` call :func:`run_on_cluster`; `dvc repro`
keeps running stages on its own host.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PLACEMENT_ENV = "MOPD_PLACEMENT"  # mopd.placement's: what the launcher gave the stage process


@dataclass(frozen=True)
class Resources:
    """What one stage asks the cluster for."""

    cpus: float = 1.0
    gpus: int = 0
    custom: dict[str, float] = field(default_factory=dict)


def stage_resources(cluster, kind: str, gpus: int) -> Resources:
    """The Ray resources of a stage of ``kind``: ``cluster.cpus`` and ``cluster.resources`` (per
    kind, ``default`` for the rest) and ``gpus`` devices."""
    cpus = cluster.cpus.get(kind, cluster.cpus.get("default", 1.0))
    custom = cluster.resources.get(kind, cluster.resources.get("default", {}))
    return Resources(float(cpus), int(gpus), dict(custom))


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``auto``: the one ``$RAY_ADDRESS`` or a local
    ``ray start`` names) once per process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace="mopd", log_to_driver=False, logging_level="WARNING")


def _stage_process(cmd: list[str], cwd: str, env: dict[str, str]) -> dict:
    """Body of the Ray task: the stage's command line on this node, with the GPUs Ray gave it."""
    import socket

    import ray

    ctx = ray.get_runtime_context()
    gpus = [str(g) for g in ray.get_gpu_ids()]
    here = {**env, PLACEMENT_ENV: json.dumps({"devices": gpus, "leased_at": time.time(), "engine": "ray",
                                              "node": ctx.get_node_id()})}
    if gpus:
        here["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    else:
        here.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, cwd=cwd, env=here, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", check=False)
    return {"returncode": proc.returncode, "output": proc.stdout[-200_000:], "node": ctx.get_node_id(),
            "host": socket.gethostname(), "gpus": gpus}


def run_on_ray(cmd: list[str], cwd: str, env: dict[str, str], resources: Resources, name: str,
               on_line: Callable[[str], None] | None = None) -> dict:
    """Run ``cmd`` as a Ray task with ``resources``; returns its exit status, output, node id,
    host and GPUs. The task is cancelled (its process killed) if the caller is interrupted."""
    import ray

    task = ray.remote(_stage_process).options(
        num_cpus=resources.cpus, num_gpus=resources.gpus, resources=resources.custom or None,
        name=f"mopd-stage:{name}", max_retries=0)
    ref = task.remote(cmd, str(cwd), env)
    try:
        out = ray.get(ref)
    except BaseException:
        ray.cancel(ref, force=True)
        raise
    if on_line is not None:
        for line in out["output"].splitlines():
            on_line(line)
    return out


def run_on_cluster(cluster, cmd: list[str], cwd, env: dict[str, str], *, kind: str, gpus: int, name: str,
                   on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run a stage's command line on the cluster engine ``cluster`` (runtime.cluster) names;
    returns (exit status, the output's last 20 lines)."""
    if cluster.engine != "ray":
        raise ValueError(f"runtime.cluster.engine = {cluster.engine!r}: not a cluster engine")
    connect(cluster.address)
    import ray

    if gpus and not ray.cluster_resources().get("GPU"):  # a CPU cluster: the stage asks for none
        gpus = 0
    out = run_on_ray(cmd, str(cwd), env, stage_resources(cluster, kind, gpus), name, on_line)
    return out["returncode"], "\n".join(out["output"].splitlines()[-20:])


def on_cluster(cluster) -> bool:
    """Whether stages run on a cluster engine (then the engine places them, not host leases)."""
    return cluster is not None and cluster.engine != "local"


__all__ = ["Resources", "connect", "on_cluster", "run_on_cluster", "run_on_ray", "stage_resources"]
