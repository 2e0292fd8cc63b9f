"""One run of a stage at a time (issue 29): an inter-process lock per stage, so two `mopd stage
distill --force`, a `dvc repro` beside a flow run, or a second flow run joining late never build
the same output folder at once.

The lock is ``flock`` on ``.mopd/locks/<stage>.lock`` (released by the kernel when its holder
dies, so a killed run never leaves a stale lock). The holder writes who it is into the file (pid,
host, since when, command line); a second run says who holds it, then waits. ``flock`` holds
between processes of one host, and on a shared filesystem only where that filesystem implements
it (NFSv4 and Lustre do; check yours before two nodes share a project).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("mopd.stage")

LOCK_DIR = Path(".mopd") / "locks"
WAIT_REPORT_S = 60.0  # while waiting, say so again this often


def lock_path(project: Path, stage: str) -> Path:
    return Path(project) / LOCK_DIR / (stage.replace(":", "__") + ".lock")


def holder(path: Path) -> str:
    """Who holds the lock at ``path``, in words (from what the holder wrote into it)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (it has not said who yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info['pid']} on {info.get('host', '?')} since {since} ({info.get('command', '?')[:200]})"


@contextlib.contextmanager
def stage_lock(project: Path, stage: str) -> Iterator[bool]:
    """Hold ``stage``'s lock for the block. Yields True when another run held it first (so the
    caller may find the stage finished by that run and not redo it), False otherwise."""
    path = lock_path(project, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    waited = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            started = time.monotonic()
            log.warning("%s: another run of this stage holds %s: %s; waiting for it to end", stage, path, holder(path))
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.5)
                    if time.monotonic() - started >= WAIT_REPORT_S:
                        started = time.monotonic()
                        log.warning("%s: still waiting for %s", stage, holder(path))
            log.info("%s: the other run ended; going on", stage)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield waited
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock
