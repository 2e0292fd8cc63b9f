"""Progress a person can follow: what each stage of a run is doing, how far it is, time left.

Two small file formats under ``.mopd/progress/<run id>/`` (no server, no Prefect: anything can
write or read them):

- ``run.json`` — written by the orchestrator (the flow): the pipeline, the run's state and each
  stage's state (``waiting`` / ``running`` / ``cached`` / ``done`` / ``failed`` / ``skipped``) with
  its start and end times.
- ``<stage>.json`` — written by the stage process itself through :func:`report`, which finds the
  file in ``$MOPD_PROGRESS_FILE``: the current step, the total and what is being counted.

:func:`render` turns both into the table `make demo` and ``mopd watch`` print.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

ENV = "MOPD_PROGRESS_FILE"
RUN_FILE = "run.json"
LATEST = "latest"
PROGRESS_DIR = Path(".mopd") / "progress"
MIN_INTERVAL = 0.5  # seconds between writes of one stage's progress file
KEEP_RUNS = 20  # progress folders of older runs are removed

_last_write = 0.0


def _atomic_write(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def report(step: int, total: int, what: str = "steps", *, force: bool = False) -> None:
    """Record this stage's progress (a no-op unless ``$MOPD_PROGRESS_FILE`` is set). Cheap to call
    every step: writes at most every ``MIN_INTERVAL`` seconds, and always at the last step."""
    global _last_write
    path = os.environ.get(ENV)
    now = time.time()
    if not path or (not force and step < total and now - _last_write < MIN_INTERVAL):
        return
    _last_write = now
    try:
        _atomic_write(Path(path), {"step": int(step), "total": int(total), "what": what, "time": now})
    except OSError:  # progress is advisory: never fail a stage over it
        pass


def stage_file(run_dir: Path, stage: str) -> Path:
    return run_dir / (stage.replace(":", "__") + ".json")


class RunBoard:
    """The orchestrator's side: one run's ``run.json``, updated from several threads."""

    def __init__(self, project: Path, run_id: str, pipeline: str, stages: list[str]):
        self.dir = project / PROGRESS_DIR / run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        _prune(project / PROGRESS_DIR, keep=KEEP_RUNS)
        self._lock = threading.Lock()
        self.data = {"run_id": run_id, "pipeline": pipeline, "state": "running",
                     "started": time.time(), "ended": None,
                     "stages": {s: {"state": "waiting"} for s in stages}}
        self._write()
        (project / PROGRESS_DIR / LATEST).write_text(run_id + "\n")

    def stage(self, name: str, state: str) -> None:
        with self._lock:
            entry = self.data["stages"].setdefault(name, {})
            entry["state"] = state
            now = time.time()
            if state == "running":
                entry["started"] = now
            elif state in ("cached", "done", "failed", "skipped"):
                entry.setdefault("started", now)
                entry["ended"] = now
            self._write()

    def finish(self, state: str) -> None:
        with self._lock:
            self.data |= {"state": state, "ended": time.time()}
            self._write()

    def progress_file(self, name: str) -> Path:
        return stage_file(self.dir, name)

    def _write(self) -> None:
        _atomic_write(self.dir / RUN_FILE, self.data)


def _prune(root: Path, keep: int) -> None:
    import shutil

    runs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def latest_run(project: Path) -> Path | None:
    pointer = project / PROGRESS_DIR / LATEST
    if not pointer.is_file():
        return None
    return project / PROGRESS_DIR / pointer.read_text().strip()


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def render(run_dir: Path, now: float | None = None) -> tuple[str, bool]:
    """(the run's table as text, whether the run has ended)."""
    run = _read(run_dir / RUN_FILE)
    if run is None:
        return f"(no progress recorded yet in {run_dir})", False
    now = now or time.time()
    end = run.get("ended") or now
    lines = [f"mopd/{run['pipeline']}  {run['state']}  {_clock(end - run['started'])}"]
    width = max((len(s) for s in run["stages"]), default=5)
    for name, st in run["stages"].items():
        state = st.get("state", "waiting")
        cols = [f"  {name:<{width}}  {state:<8}"]
        prog = _read(stage_file(run_dir, name)) if state in ("running", "done") else None
        started = st.get("started")
        if prog and prog.get("total"):
            step, total = prog["step"], prog["total"]
            cols.append(f"{step:>6}/{total:<6} {prog.get('what', ''):<8}")
            if state == "running" and started and step > 0:
                elapsed = now - started
                cols.append(f"{_clock(elapsed)} elapsed, ~{_clock(elapsed / step * (total - step))} left")
        if state != "running" and started and st.get("ended") and state != "cached":
            cols.append(f"took {_clock(st['ended'] - started)}")
        elif state == "running" and started and not (prog and prog.get("total")):
            cols.append(f"{_clock(now - started)} elapsed")
        lines.append("  ".join(cols).rstrip())
    return "\n".join(lines), run["state"] != "running"


def watch(run_dir: Path, *, interval: float = 2.0, stream=None, is_done=None) -> None:
    """Print ``render`` until the run ends: redrawn in place on a terminal, else a new table
    whenever a stage changes state (and at most every 60 s otherwise)."""
    import sys

    stream = stream or sys.stdout
    tty = stream.isatty()
    last_states, last_print, drawn = None, 0.0, 0
    while True:
        text, ended = render(run_dir)
        ended = ended or bool(is_done and is_done())
        run = _read(run_dir / RUN_FILE) or {}
        states = {k: v.get("state") for k, v in run.get("stages", {}).items()}
        if tty:
            if drawn:
                stream.write(f"\x1b[{drawn}F\x1b[J")
            stream.write(text + "\n")
            drawn = text.count("\n") + 1
        elif states != last_states or time.time() - last_print > 60 or ended:
            stream.write(text + "\n\n")
            last_states, last_print = states, time.time()
        stream.flush()
        if ended:
            return
        time.sleep(interval)
