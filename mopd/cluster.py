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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mopd.runtime import parent_death_signal

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


def _stage_process(cmd: list[str], cwd: str, env: dict[str, str], nodes: list[str] | None = None) -> dict:
    """Body of the Ray task: the stage's command line on this node, with the GPUs Ray gave it
    (``nodes``: every node of a multi-node stage, recorded with the placement)."""
    import socket

    import ray

    ctx = ray.get_runtime_context()
    gpus = [str(g) for g in ray.get_gpu_ids()]
    where = {"devices": gpus, "leased_at": time.time(), "engine": "ray", "node": ctx.get_node_id()}
    here = {**env, PLACEMENT_ENV: json.dumps(where | ({"nodes": nodes} if nodes else {}))}
    if gpus:
        here["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    else:
        here.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, cwd=cwd, env=here, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", check=False,
                          preexec_fn=parent_death_signal)  # dies with this Ray worker (a cancelled task)
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


def _node_address() -> dict:
    """Where a bundle landed: its node id, IP, and a free port there (a rendezvous)."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(), "port": port}


# why: 7 parameters: the command for each node (`mopd.launch`, which builds its node's accelerate
# launch), its working directory and environment, the resources and number of nodes, the stage's
# name and the output callback.
def run_on_nodes(cmd: list[str], cwd: str, env: dict[str, str], resources: Resources, nodes: int, name: str,
                 on_line: Callable[[str], None] | None = None) -> dict:
    """Run a data-parallel stage on ``nodes`` Ray nodes at once: a placement group of one bundle
    per node (STRICT_SPREAD: distinct nodes), node 0's IP and a free port there as the
    rendezvous, then ``cmd`` in every bundle with its machine rank (``$MOPD_NUM_MACHINES``,
    ``$MOPD_MACHINE_RANK``, ``$MOPD_MAIN_PROCESS_IP`` / ``_PORT``: mopd.runtime.launch_prefix).
    Returns node 0's output and node ids; a failed node fails the stage."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": resources.cpus, **({"GPU": resources.gpus} if resources.gpus else {}), **resources.custom}
    pg = placement_group([bundle] * nodes, strategy="STRICT_SPREAD", name=f"mopd-stage:{name}")
    try:
        ray.get(pg.ready())

        def in_bundle(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)

        probe = ray.remote(_node_address)
        where = ray.get([probe.options(num_cpus=0, scheduling_strategy=in_bundle(i)).remote()
                         for i in range(nodes)])
        task = ray.remote(_stage_process)
        refs = [task.options(num_cpus=resources.cpus, num_gpus=resources.gpus, resources=resources.custom or None,
                             scheduling_strategy=in_bundle(i), name=f"mopd-stage:{name}:node{i}", max_retries=0)
                .remote(cmd, cwd, {**env, "MOPD_NUM_MACHINES": str(nodes), "MOPD_MACHINE_RANK": str(i),
                                   "MOPD_MAIN_PROCESS_IP": where[0]["ip"],
                                   "MOPD_MAIN_PROCESS_PORT": str(where[0]["port"])},
                        [w["node"] for w in where])
                for i in range(nodes)]
        try:
            outs = ray.get(refs)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
    finally:
        remove_placement_group(pg)
    if on_line is not None:
        for line in outs[0]["output"].splitlines():
            on_line(line)
    failed = [i for i, o in enumerate(outs) if o["returncode"] != 0]
    first = outs[failed[0]] if failed else outs[0]
    return {**first, "returncode": first["returncode"], "nodes": [o["node"] for o in outs]}


# why: 9 parameters: the cluster section, the stage's command line, directory and environment,
# its kind, devices, module and name (what it asks for and how a node relaunches it), and the
# output callback.
def run_on_cluster(cluster, cmd: list[str], cwd, env: dict[str, str], *, kind: str, gpus: int, name: str,
                   module: str | None = None, on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run a stage's command line on the cluster engine ``cluster`` (runtime.cluster) names;
    returns (exit status, the output's last 20 lines). A kind with `cluster.nodes` > 1 runs on
    that many nodes (:func:`run_on_nodes`): each node starts ``module`` through `mopd.launch`,
    which builds its own share of the launch."""
    if cluster.engine != "ray":
        raise ValueError(f"runtime.cluster.engine = {cluster.engine!r}: not a cluster engine")
    connect(cluster.address)
    import ray

    nodes = cluster.nodes.get(kind, cluster.nodes.get("default", 1))
    if gpus and not ray.cluster_resources().get("GPU"):  # a CPU cluster: the stage asks for none
        gpus = 0
    if nodes > 1 and module in cmd:
        per_node = stage_resources(cluster, kind, gpus // nodes)
        node_cmd = [sys.executable, "-m", "mopd.launch", *cmd[cmd.index(module):]]
        out = run_on_nodes(node_cmd, str(cwd), env, per_node, nodes, name, on_line)
    else:
        out = run_on_ray(cmd, str(cwd), env, stage_resources(cluster, kind, gpus), name, on_line)
    return out["returncode"], "\n".join(out["output"].splitlines()[-20:])


def on_cluster(cluster) -> bool:
    """Whether stages run on a cluster engine (then the engine places them, not host leases)."""
    return cluster is not None and cluster.engine != "local"


__all__ = ["Resources", "connect", "on_cluster", "run_on_cluster", "run_on_nodes", "run_on_ray",
           "stage_resources"]
