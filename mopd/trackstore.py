"""When the tracking store fails (issue 29; the rule is stated in docs/tracking.md).

A stage's outcome is decided by its work, never by its tracking:

- Every call to the store is retried with backoff while the failure looks transient (SQLite's
  ``database is locked``, a busy or unreachable server), for up to ``$MOPD_TRACKING_RETRY_S``
  seconds (default 60). Then it is a :class:`TrackingError` that names the store.
- **Before the work** (the stage's run cannot be created): the stage fails at once, exit status 2,
  having changed nothing: its previous outputs and record stay, `mopd plan` says what it said
  before, and no MLflow run exists for the attempt.
- **After the run started** (a metric, tag, artifact, the final status): a *tracking gap*. The
  stage goes on and completes (exit 0, ``result.json`` written, `plan` calls it cached); the
  warning names the store; the tracker stops calling the store for the rest of the stage; and the
  run's final status is written to ``.mopd/tracking_gaps.jsonl`` when the store refuses it too.
  The next mopd process that opens the store (any stage, `mopd run`, the flow) closes each pending
  run with that status and the tag ``mopd.tracking_gap`` naming what was not logged, so the MLflow
  run status ends up agreeing with the record instead of staying RUNNING.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger("mopd.tracking")

RETRY_ENV = "MOPD_TRACKING_RETRY_S"
DEFAULT_RETRY_S = 60.0
GAP_TAG = "mopd.tracking_gap"
GAPS_FILE = "tracking_gaps.jsonl"
_TRANSIENT = ("locked", "busy", "timed out", "timeout", "connection", "temporarily unavailable", "503", "502")

T = TypeVar("T")


class TrackingError(RuntimeError):
    """The tracking store could not be used; the message names it and what was tried."""


def retry_budget() -> float:
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError:
        raise TrackingError(f"${RETRY_ENV}={os.environ[RETRY_ENV]!r}: not a number of seconds") from None


def transient(exc: BaseException) -> bool:
    """A failure worth retrying: the store is busy or unreachable, not refusing the request."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(t in text for t in _TRANSIENT)


def call(uri: str, what: str, fn: Callable[[], T]) -> T:
    """``fn()``, retried with exponential backoff (0.5 s doubling, at most 8 s apart) while it
    fails transiently, within :func:`retry_budget`; then :class:`TrackingError` naming ``uri``."""
    import tenacity

    budget = retry_budget()
    started = time.monotonic()
    try:
        for attempt in tenacity.Retrying(
                retry=tenacity.retry_if_exception(transient), reraise=True,
                stop=tenacity.stop_after_delay(budget), wait=tenacity.wait_exponential(multiplier=0.5, max=8),
                before_sleep=lambda rs: logger.warning("MLflow tracking store %s: %s failed (%s); retrying",
                                                       uri, what, _short(rs.outcome.exception()))):
            with attempt:
                return fn()
    except Exception as exc:
        if not transient(exc):
            raise
        took = time.monotonic() - started
        raise TrackingError(
            f"MLflow tracking store {uri}: {what} failed for {took:.0f} s ({_short(exc)}); another process "
            f"may hold it (a stuck `mlflow ui`, a second run): stop it, raise ${RETRY_ENV} (now "
            f"{budget:g} s), or point MLFLOW_TRACKING_URI at another store") from None
    raise AssertionError("unreachable")  # tenacity either returns or raises


def _short(exc: BaseException | None, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_gap(gap_file: Path, *, uri: str, run_id: str, status: str, missing: list[str], error: str) -> None:
    """A run whose final status the store refused: closed later by :func:`close_pending`."""
    entry = {"uri": uri, "run_id": run_id, "status": status, "missing": missing[:20], "error": error[:500],
             "at": time.time()}
    with _locked(gap_file), open(gap_file, "a") as f:
        f.write(json.dumps(entry) + "\n")


def pending(gap_file: Path) -> list[dict[str, Any]]:
    """The runs waiting to be closed (unreadable lines are skipped, and said)."""
    if not gap_file.is_file():
        return []
    out = []
    for n, line in enumerate(gap_file.read_text(errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
            if isinstance(entry, dict) and {"uri", "run_id", "status"} <= set(entry):
                out.append(entry)
                continue
        except ValueError:
            pass
        if line.strip():
            logger.warning("%s: line %d is not a tracking-gap record; ignored", gap_file, n)
    return out


def close_pending(gap_file: Path, uri: str, close: Callable[[dict[str, Any]], None]) -> int:
    """Close every pending run of store ``uri`` with ``close(entry)``; the entries closed (and
    unreadable lines) leave the file, the others stay. Returns how many were closed."""
    if not gap_file.is_file():
        return 0
    with _locked(gap_file):
        keep, closed = [], 0
        for entry in pending(gap_file):
            if entry["uri"] != uri:
                keep.append(entry)
                continue
            try:
                close(entry)
                closed += 1
            except Exception as exc:  # noqa: BLE001 -- the store's or the client's error: try again next time
                logger.warning("MLflow run %s: could not close it yet (%s)", entry["run_id"], _short(exc))
                keep.append(entry)
        tmp = gap_file.with_name(gap_file.name + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in keep))
        os.replace(tmp, gap_file)
    if closed:
        logger.info("MLflow tracking store %s: closed %d run(s) left open by tracking gaps (%s)", uri, closed, gap_file)
    return closed
