"""Running teacher servers: `serve` (the body of `mopd serve-teacher`) and
`local_teacher_servers`, which starts local checkpoints as server subprocesses on free
127.0.0.1 ports for the duration of a `with` block (the distill stage's `teacher_transport: http`)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

# the server runs as `python -m mopd.teachers.command serve-teacher` (mopd.codedeps: not an import)
__mopd_deps__ = ("mopd.teachers.command",)

import httpx
from uvicorn.protocols.http.h11_impl import H11Protocol

from mopd.teachers.server import ServerLimits, create_app

log = logging.getLogger(__name__)


# why: 9 parameters: one keyword-only parameter per `mopd serve-teacher` option
# (mopd/teachers/command.py passes them through one to one).
def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          limits: ServerLimits = ServerLimits(), dtype: str | None = None, device: str | None = None,
          threads: int | None = None, name: str | None = None) -> None:
    """Load ``model_path`` (a local checkpoint or hub id) and serve it until interrupted.
    Requests may name the model by ``name`` (default: the path) or by the path."""
    import torch
    import uvicorn

    from mopd.models import load_model, load_tokenizer

    warning = bind_warning(host, token)
    if warning:
        log.warning(warning)
    if threads:
        torch.set_num_threads(threads)
    model = load_model(model_path, dtype=dtype, device=device)  # default: the stage's runtime setting
    try:
        tokenizer = load_tokenizer(model_path)
    except (OSError, ValueError):  # a bare model directory: no decoded_token strings
        tokenizer = None
    app = create_app(model, tokenizer, name=name or str(model_path), aliases=[str(model_path)],
                     token=token, limits=limits)
    log.info("teacher %s serving on http://%s:%d", model_path, host, port)
    uvicorn.Server(uvicorn_config(app, host, port, limits)).run()


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the server to this machine only."""
    if host.strip("[]").lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def bind_warning(host: str, token: str | None) -> str | None:
    """The loud warning for a server reachable from other machines without a bearer token."""
    if token or is_loopback(host):
        return None
    return (f"\n{'!' * 78}\n!! teacher server bound to {host} WITHOUT a bearer token: anyone who "
            f"can reach this\n!! address can use the model. Pass --token-env VAR (and send "
            f"'Authorization: Bearer ...')\n!! or bind 127.0.0.1.\n{'!' * 78}")


class _TimedH11(H11Protocol):
    """uvicorn's h11 protocol plus a header timeout, which uvicorn lacks: a connection whose
    request line and headers are not complete ``header_timeout`` seconds after it opened (or
    after the previous response) is closed, so slow or idle clients cannot hold connections.
    uvicorn's keep-alive timer is cancelled by any byte received; this one is not."""

    header_timeout = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _expire(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete  # no request being served
        if idle and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, host: str, port: int, limits: ServerLimits = ServerLimits(), **kwargs):
    """The uvicorn configuration every teacher server runs with (h11 with a header timeout,
    header size cap, keep-alive timeout, connection cap)."""
    import uvicorn

    protocol = type("TimedH11", (_TimedH11,), {"header_timeout": limits.header_timeout})
    return uvicorn.Config(app, host=host, port=port, http=protocol,
                          timeout_keep_alive=limits.keep_alive_timeout,
                          h11_max_incomplete_event_size=limits.max_header_bytes,
                          limit_concurrency=limits.max_connections,
                          log_level=kwargs.pop("log_level", "warning"),
                          access_log=kwargs.pop("access_log", False), **kwargs)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    """Poll ``url/health`` until 200; raise if the process exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"teacher server for {url} exited with code {proc.returncode} "
                               "before becoming healthy (see its log above)")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"teacher server at {url} not healthy after {timeout:.0f}s")


def start_server(model_path: Path | str, *, port: int | None = None, threads: int | None = None,
                 token_env: str | None = None, extra_args: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """Start `mopd serve-teacher` as a subprocess on 127.0.0.1; returns (process, base URL)
    without waiting for it (see `wait_healthy`)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "mopd.teachers.command", "serve-teacher", "--model", str(model_path),
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    if threads:
        cmd += ["--threads", str(threads)]
    if token_env:
        cmd += ["--token-env", token_env]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def local_teacher_servers(models: dict[str, Path | str], *, threads: int | None = None,
                          startup_timeout: float = 180.0) -> Iterator[dict[str, str]]:
    """Domain -> base URL of a server subprocess for each checkpoint (one process per distinct
    path, shared by domains routed to the same checkpoint); all stopped on exit."""
    procs: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for path in dict.fromkeys(str(p) for p in models.values()):
            procs[path] = start_server(path, threads=threads)
        for path, (proc, url) in procs.items():
            wait_healthy(url, proc, startup_timeout)
            log.info("local teacher %s ready at %s", path, url)
        yield {d: procs[str(p)][1] for d, p in models.items()}
    finally:
        for proc, _ in procs.values():
            stop_server(proc)
