"""Placement: which of the host's devices a stage process gets (torch-free: the flow imports it).

The host's devices are an *inventory* of CUDA device ids: ``$MOPD_DEVICES`` when set (``0,1,2``;
empty or ``none`` = no devices; a CPU test fakes a GPU host with it), else the ids in
``$CUDA_VISIBLE_DEVICES`` when set, else the GPUs ``nvidia-smi -L`` lists, else none. Each
model-running stage asks for ``runtime.devices_per_stage`` of them (per stage kind, ``default``
for the rest; a data-parallel stage at least one per process). Before its process starts, the
launcher — the flow, ``mopd run``, ``mopd stage``, or the stage itself under ``dvc repro`` —
takes a *lease*: an exclusive ``flock`` on one lock file per device under a host-wide folder
(``$MOPD_DEVICE_LOCKS``, default ``<tmp>/mopd-devices-<uid>``), so every launcher on the host
shares one set of slots and a killed launcher's locks go with its process. The stage process
sees only its devices (``CUDA_VISIBLE_DEVICES``; ``cuda`` / ``auto`` is then its first one) and
records them in its ``result.json`` (``placement``) and MLflow tags (``runtime/devices``).

On a host without devices nothing is leased and nothing changes: stages share the CPU under the
flow's process limit (``MOPD_MAX_PARALLEL``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

DEVICES_ENV = "MOPD_DEVICES"
LOCKS_ENV = "MOPD_DEVICE_LOCKS"
# Set by the launcher for the stage process: the leased ids (JSON list) and when it got them.
PLACEMENT_ENV = "MOPD_PLACEMENT"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")  # an index, or a GPU UUID / MIG id


class PlacementError(ValueError):
    pass


def _parse(raw: str, source: str) -> list[str]:
    raw = raw.strip()
    if raw.lower() in ("", "none", "cpu", "-1"):
        return []
    ids = [x.strip() for x in raw.split(",")]
    bad = [x for x in ids if not _ID.match(x)]
    if bad or len(set(ids)) != len(ids):
        raise PlacementError(f"${source} = {raw!r}: expected distinct device ids separated by commas "
                             f"(e.g. 0,1,2){f'; not an id: {bad}' if bad else '; an id repeats'}")
    return ids


def inventory() -> list[str]:
    """The host's device ids, as ``CUDA_VISIBLE_DEVICES`` names them (see the module doc)."""
    if DEVICES_ENV in os.environ:
        return _parse(os.environ[DEVICES_ENV], DEVICES_ENV)
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return _parse(os.environ["CUDA_VISIBLE_DEVICES"], "CUDA_VISIBLE_DEVICES")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", out, re.MULTILINE)]


def wanted(devices_per_stage: dict[str, int], kind: str, *, runs_models: bool, processes: int = 1) -> int:
    """Devices a stage of ``kind`` asks for: none unless it runs models; else its
    ``devices_per_stage`` entry (or ``default``), at least one per data-parallel process."""
    if not runs_models:
        return 0
    return max(devices_per_stage.get(kind, devices_per_stage.get("default", 1)), processes)


def lock_dir() -> Path:
    return Path(os.environ.get(LOCKS_ENV) or Path(tempfile.gettempdir()) / f"mopd-devices-{os.getuid()}")


class Lease:
    """Devices held for one stage: ``ids``; ``release()`` (or the end of the process) frees them."""

    def __init__(self, ids: list[str], fds: list[int], since: float, host: list[str] | None = None):
        self.ids, self._fds, self.since, self.host = ids, fds, since, host

    def env(self) -> dict[str, str]:
        """What the stage process needs to see only its devices and record them; and the host's
        inventory (``$MOPD_DEVICES``), which its own ``CUDA_VISIBLE_DEVICES`` would otherwise hide
        from what it leases itself (vLLM teacher servers)."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.ids),
                PLACEMENT_ENV: json.dumps({"devices": self.ids, "leased_at": self.since}),
                **({DEVICES_ENV: ",".join(self.host)} if self.host else {})}

    def release(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        self._fds = []


def try_lease(n: int, who: str, devices: list[str] | None = None) -> Lease | None:
    """``n`` free devices of the inventory (lowest ids first), or None without waiting."""
    devices = inventory() if devices is None else devices
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    got: list[tuple[str, int]] = []
    for dev in devices:
        fd = os.open(folder / f"{dev}.lock", os.O_RDWR | os.O_CREAT, 0o600)  # not inherited (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {who}\n".encode(), 0)  # who holds it, for the waiting message
        got.append((dev, fd))
        if len(got) == n:
            return Lease([d for d, _ in got], [f for _, f in got], time.time(), host=list(devices))
    Lease([], [f for _, f in got], 0.0).release()
    return None


def holders(devices: list[str]) -> dict[str, str]:
    """Device -> what its lock file says holds it (pid and stage), for messages."""
    out = {}
    for dev in devices:
        with contextlib.suppress(OSError):
            out[dev] = (lock_dir() / f"{dev}.lock").read_text().strip()
    return out


def acquire(n: int, who: str, *, devices: list[str] | None = None, poll: float = 0.5,
            on_wait: Callable[[], None] | None = None) -> Lease:
    """Wait for ``n`` devices (``on_wait`` is called once if they are not free at once). A stage
    that asks for more devices than the host has fails at once, naming the setting."""
    devices = inventory() if devices is None else devices
    if n > len(devices):
        raise PlacementError(f"{who} asks for {n} device(s) (runtime.devices_per_stage, or one per "
                             f"runtime.processes), but this host has {len(devices)}: {devices} "
                             f"(${DEVICES_ENV} / CUDA_VISIBLE_DEVICES / nvidia-smi)")
    told = False
    while True:
        lease = try_lease(n, who, devices)
        if lease is not None:
            return lease
        if not told:
            log.info("%s: waiting for %d device(s); held: %s", who, n, holders(devices))
            told = True
            if on_wait is not None:
                on_wait()
        time.sleep(poll)


@contextlib.contextmanager
def leased(n: int, who: str, *, devices: list[str] | None = None) -> Iterator[Lease | None]:
    """``n`` devices for the duration of the block (None when ``n`` is 0 or the host has none)."""
    if n == 0:
        yield None
        return
    devices = inventory() if devices is None else devices
    if not devices:
        yield None
        return
    lease = acquire(n, who, devices=devices)
    try:
        yield lease
    finally:
        lease.release()


def current() -> dict | None:
    """The placement the launcher gave this process (``$MOPD_PLACEMENT``), or None."""
    raw = os.environ.get(PLACEMENT_ENV)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise PlacementError(f"${PLACEMENT_ENV} = {raw!r}: not the JSON a launcher writes") from None
    if not isinstance(value, dict) or not isinstance(value.get("devices"), list):
        raise PlacementError(f"${PLACEMENT_ENV} = {raw!r}: expected {{\"devices\": [...], \"leased_at\": t}}")
    return value
