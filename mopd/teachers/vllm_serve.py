"""`distill.teacher_transport: vllm`: each local teacher checkpoint served by `vllm serve` for the
stage's duration, scored through the HTTP client every served teacher uses (:class:`HTTPTeacher`:
``/v1/completions`` with vLLM's ``prompt_logprobs``), so the student's process holds no teacher.

Where the servers run (``distill.teacher_vllm.placement``): ``own`` leases
``teacher_vllm.devices`` devices per server from the host's inventory (:mod:`mopd.placement`, the
same locks the stages take), beside the stage's own devices; ``shared`` puts them on the stage's
devices. One server per distinct checkpoint; under data parallelism process 0 starts them and
every process scores against them (one node: they listen on 127.0.0.1; across nodes, serve the
teachers yourself and route to them as remote teachers).

Command construction is plain Python (tested on CPU); starting a server needs the `gpu` extra on
a CUDA host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from mopd import placement
from mopd.teachers.launch import free_port, stop_server, wait_healthy

log = logging.getLogger(__name__)


def vllm_cli() -> list[str]:
    """vLLM's command line in this Python environment (the `gpu` extra), as TRL starts it."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise FileNotFoundError("distill.teacher_transport = 'vllm' needs vLLM: install the `gpu` extra "
                                "(pip install 'mopd[gpu]') on a CUDA host, or use teacher_transport: http")
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


# why: 7 parameters: the checkpoint and its port, the name clients ask for, the dtype and the
# largest top-k the stage requests, the settings section, and the CLI prefix (tests pass one).
def vllm_serve_command(model: Path | str, *, port: int, name: str, dtype: str, max_logprobs: int, settings,
                       cli: list[str] | None = None) -> list[str]:
    """The `vllm serve` command line of one teacher server (``settings``: a VLLMServeParams)."""
    cmd = [*(cli or vllm_cli()), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", name, "--dtype", dtype,
           "--tensor-parallel-size", str(settings.devices),
           "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
           # top-k scoring asks prompt_logprobs=k; vLLM refuses more than --max-logprobs
           "--max-logprobs", str(max(20, max_logprobs))]
    if settings.max_model_len:
        cmd += ["--max-model-len", str(settings.max_model_len)]
    return cmd + list(settings.extra_args)


def server_devices(n_servers: int, settings, own: list[str], who: str,
                   stack: contextlib.ExitStack) -> list[list[str]]:
    """The devices of each of ``n_servers`` servers: leased from the inventory (``own``
    placement; held until ``stack`` closes) or the stage's own ``own`` devices (``shared``).
    Raises PlacementError when the host cannot ever hold them beside the stage."""
    per = settings.devices
    if settings.placement == "shared":
        if own and per > len(own):
            raise placement.PlacementError(f"distill.teacher_vllm.devices = {per}, but the stage holds {len(own)} "
                                           f"device(s) {own} (placement: shared)")
        return [own[:per] if own else [] for _ in range(n_servers)]
    host = placement.inventory()
    spare = [d for d in host if d not in own]
    if per * n_servers > len(spare):
        raise placement.PlacementError(
            f"distill.teacher_vllm: {n_servers} teacher server(s) x {per} device(s) do not fit beside the stage's "
            f"{own or 'no'} device(s) on this host's {host or 'no devices'}: set teacher_vllm.placement: shared, "
            "or lower teacher_vllm.devices")
    out = []
    for i in range(n_servers):
        lease = placement.acquire(per, f"{who} teacher server {i}", devices=spare)
        stack.callback(lease.release)
        out.append(lease.ids)
    return out


def start_on_devices(cmd: list[str], devices: list[str], who: str,
                     extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server's ``cmd`` seeing only ``devices`` (all of this process's when empty), without
    waiting for it (:func:`mopd.teachers.launch.wait_healthy`)."""
    env = {**os.environ, **(extra_env or {}), **({"CUDA_VISIBLE_DEVICES": ",".join(devices)} if devices else {})}
    log.info("%s: %s (devices %s)", who, " ".join(cmd), devices or "inherited")
    return subprocess.Popen(cmd, env=env)


@contextlib.contextmanager
def vllm_teacher_servers(models: dict[str, Path | str], settings, *, dtype: str, max_logprobs: int,
                         who: str = "distill") -> Iterator[dict[str, str]]:
    """Domain -> base URL of a `vllm serve` process for each distinct checkpoint, on devices from
    the inventory (see the module doc); every server stopped, every lease released on exit."""
    own = list((placement.current() or {}).get("devices") or [])
    with contextlib.ExitStack() as stack:
        paths = list(dict.fromkeys(str(p) for p in models.values()))
        devices = server_devices(len(paths), settings, own, who, stack)
        procs: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for path, devs in zip(paths, devices):
                port = free_port()
                name = next(d for d, p in models.items() if str(p) == path)
                cmd = vllm_serve_command(path, port=port, name=name, dtype=dtype, max_logprobs=max_logprobs,
                                         settings=settings)
                procs[path] = (start_on_devices(cmd, devs, f"teacher {name}"), f"http://127.0.0.1:{port}")
            for path, (proc, url) in procs.items():
                wait_healthy(url, proc, settings.startup_timeout)
                log.info("vLLM teacher %s ready at %s", path, url)
            yield {d: procs[str(p)][1] for d, p in models.items()}
        finally:
            for proc, _ in procs.values():
                stop_server(proc, grace=30.0)
