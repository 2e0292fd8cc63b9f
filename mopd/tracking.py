"""Experiment tracking behind a small protocol: an MLflow adapter and a null tracker.

Stages log through :class:`Tracker`; nothing else in the library imports MLflow.

Why ``MlflowClient`` only (no ``mlflow.start_run``): the pipeline runs stages in Prefect worker
threads, and MLflow's "active run" is thread-local global state that those threads do not inherit.
Every call here names its run id explicitly, so any thread (or process, via
:meth:`MLflowTracker.attach`) can log to any run, and children nest under their parent through the
``mlflow.parentRunId`` tag.

Metrics are buffered in memory and sent with ``client.log_batch`` (at most 1000 metrics per call,
MLflow's limit) when the buffer fills, on :meth:`flush`, and on :meth:`end`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mopd import trackstore

logger = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAMS_TAGS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
STATUSES = ("FINISHED", "FAILED", "KILLED")

# SQLite allows one writer at a time; serialising this process's writes per store avoids
# "database is locked" when several stage threads log at once.
_STORE_LOCKS: dict[str, threading.RLock] = {}
_STORE_LOCKS_GUARD = threading.Lock()


@runtime_checkable
class Tracker(Protocol):
    """What a stage may do with its run. ``run_id`` is None for trackers that persist nothing."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_metric_series(
        self, name: str, values: Sequence[float], steps: Sequence[int] | None = None
    ) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_figure(self, fig: Any, name: str) -> None: ...

    def child(self, name: str, **tags: Any) -> Tracker: ...

    def log_table(self, rows: Sequence[Mapping[str, Any]], name: str) -> None: ...

    def log_dataset(self, path: str | Path, name: str, context: str) -> None: ...

    def register_model(self, name: str, source: str, tags: Mapping[str, Any],
                       description: str = "") -> str | None: ...

    def flush(self) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...


# ----------------------------------------------------------------------------------------------
# shared validation


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys (``{"a": {"b": 1}} -> {"a.b": "1"}``); values become strings."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping, got {type(params).__name__}")
    flat: dict[str, str] = {}
    for key, value in params.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{full}."))
        else:
            flat[full] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return flat


def _check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric name must be a non-empty string, got {name!r}")
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {name!r} must be a number, got {value!r}") from None
    return out


def _check_series(name: str, values: Sequence[float], steps: Sequence[int] | None) -> list[tuple[int, float]]:
    values = [float(v) for v in values]
    steps = list(range(len(values))) if steps is None else [int(s) for s in steps]
    if len(steps) != len(values):
        raise ValueError(
            f"log_metric_series({name!r}): {len(values)} values but {len(steps)} steps; pass one step per value"
        )
    return list(zip(steps, values, strict=True))


def _check_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    return status


def _now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------------------------
# null tracker


@dataclass
class NullTracker:
    """Persists nothing; keeps what it was given in memory so tests can assert on it.

    ``metrics[name]`` is a list of ``(step, value)``; ``children[name]`` the child trackers.
    """

    name: str = "null"
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    children: dict[str, NullTracker] = field(default_factory=dict)
    datasets: list[tuple[Path, str, str]] = field(default_factory=list)
    status: str | None = None
    _auto_step: dict[str, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def run_id(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(flatten_params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        with self._lock:
            for name, value in _check_metrics(metrics).items():
                s = self._auto_step.get(name, 0) if step is None else int(step)
                self._auto_step[name] = s + 1
                self.metrics.setdefault(name, []).append((s, value))

    def log_metric_series(
        self, name: str, values: Sequence[float], steps: Sequence[int] | None = None
    ) -> None:
        pairs = _check_series(name, values, steps)
        with self._lock:
            self.metrics.setdefault(name, []).extend(pairs)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update({str(k): str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: no such file or directory: {path}")
        self.artifacts.append((path, artifact_path))

    def log_figure(self, fig: Any, name: str) -> None:
        self.figures.append(name)

    def child(self, name: str, **tags: Any) -> NullTracker:
        with self._lock:
            child = NullTracker(name=name)
            child.set_tags(tags)
            self.children[name] = child
            return child

    def log_table(self, rows: Sequence[Mapping[str, Any]], name: str) -> None:
        self.artifacts.append((Path(name), None))

    def log_dataset(self, path: str | Path, name: str, context: str) -> None:
        self.datasets.append((Path(path), name, context))

    def register_model(self, name: str, source: str, tags: Mapping[str, Any],
                       description: str = "") -> str | None:
        return None

    def flush(self) -> None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        self.status = _check_status(status)

    def last(self, name: str) -> float:
        """Last logged value of metric ``name`` (KeyError naming it if never logged)."""
        if name not in self.metrics:
            raise KeyError(f"metric {name!r} was never logged; logged: {sorted(self.metrics)}")
        return self.metrics[name][-1][1]

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")


# ----------------------------------------------------------------------------------------------
# MLflow


def default_tracking_uri(project_dir: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project_dir>/.mopd/mlflow.db`` (dir created)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    store_dir = Path(project_dir).resolve() / ".mopd"
    store_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store_dir / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a local SQLite store, ``<db dir>/mlartifacts`` (so ``.mopd/mlartifacts``); else None,
    which lets the server choose (an HTTP server proxies artifacts itself)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri[len("sqlite:///"):])
    art = db_path.parent / "mlartifacts"
    art.mkdir(parents=True, exist_ok=True)
    return art.resolve().as_uri()


def _store_lock(tracking_uri: str) -> threading.RLock:
    with _STORE_LOCKS_GUARD:
        return _STORE_LOCKS.setdefault(tracking_uri, threading.RLock())


def _gap_text(missing: list[str]) -> str:
    shown = ", ".join(dict.fromkeys(missing))
    return f"not logged (the store failed): {shown[:MAX_TAG_VAL_LENGTH - 100]}"


def _close_gap(client, entry: dict[str, Any]) -> None:
    """Close a run a tracking gap left open (mopd.trackstore.close_pending)."""
    run_id = str(entry["run_id"])
    client.set_tag(run_id, trackstore.GAP_TAG, _gap_text(list(entry.get("missing") or ["status"])))
    client.set_terminated(run_id, status=_check_status(str(entry["status"])))


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient  # lazy: mlflow import costs ~1-2 s

    return MlflowClient(tracking_uri=tracking_uri)


# The experiment holds training runs (stages, metrics, artifacts), and says so. MLflow 3.17's UI
# does not read this tag to pick an experiment's first page: its per-browser GenAI / Model
# training toggle decides (mlflow/mlflow#24498), so `make ui` prints a runs URL
# (?workflowType=machine_learning; benchmarks/ui_check.py). Kept for clients that read it.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
        except MlflowException:  # another process created it between our get and create
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if "mlflow.experimentKind" not in exp.tags:  # an experiment made before this tag was set
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


class MLflowTracker:
    """A :class:`Tracker` over one MLflow run, using ``MlflowClient`` with explicit run ids.

    Thread-safe: a parent and its children may be used from different threads. Use
    :meth:`start` to create a run and :meth:`attach` to reopen one by id.
    """

    def __init__(self, client, run_id: str, experiment_id: str, tracking_uri: str,
                 gap_file: Path | None = None) -> None:
        self._client = client
        self._run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self._buffer: list[Any] = []  # mlflow.entities.Metric
        self._auto_step: dict[str, int] = {}
        self._lock = threading.Lock()
        self._store_lock = _store_lock(tracking_uri)
        self._ended = False
        # tracking gaps (mopd.trackstore): with a gap file, a store that fails after the run started
        # costs the rest of the run's tracking, never the stage's work
        self._gap_file = gap_file
        self._missing: list[str] = []  # what was not logged, once the store failed

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        experiment: str,
        run_name: str,
        *,
        tracking_uri: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        artifact_location: str | None = None,
        gap_file: Path | None = None,
    ) -> MLflowTracker:
        """Create a run in ``experiment`` (created if missing, with ``artifact_location`` or, for
        a local SQLite store, ``<db dir>/mlartifacts``). ``tracking_uri`` None means
        ``default_tracking_uri(Path.cwd())``. ``parent_run_id`` nests the run under that run.
        Raises :class:`mopd.trackstore.TrackingError` naming the store when it stays unreachable.
        With ``gap_file``, later store failures are tracking gaps (mopd.trackstore), and runs left
        open by earlier gaps are closed first."""
        if not experiment:
            raise ValueError("experiment must be a non-empty name")
        if not run_name:
            raise ValueError("run_name must be a non-empty name")
        uri = tracking_uri or default_tracking_uri(Path.cwd())
        run_tags = {str(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in (tags or {}).items()}
        if parent_run_id is not None:
            run_tags[PARENT_TAG] = parent_run_id
        client = None

        def create():
            nonlocal client
            client = client or _client(uri)  # (a SQLite store is opened, and its tables read, here)
            exp_id = _get_or_create_experiment(
                client, experiment, artifact_location or default_artifact_location(uri)
            )
            return exp_id, client.create_run(exp_id, run_name=run_name, tags=run_tags)

        with _store_lock(uri):
            exp_id, run = trackstore.call(uri, f"creating run {run_name!r}", create)
            if gap_file is not None:
                trackstore.close_pending(gap_file, uri, lambda e: _close_gap(client, e))
        logger.info("MLflow run %s (%s) started in experiment %r at %s", run_name, run.info.run_id, experiment, uri)
        return cls(client, run.info.run_id, exp_id, uri, gap_file)

    @classmethod
    def attach(cls, run_id: str, tracking_uri: str | None = None) -> MLflowTracker:
        """Reopen an existing run (e.g. a parent created by another process) to log into it."""
        from mlflow.exceptions import MlflowException

        uri = tracking_uri or default_tracking_uri(Path.cwd())
        client = _client(uri)
        try:
            with _store_lock(uri):
                run = client.get_run(run_id)
        except MlflowException as e:
            raise ValueError(f"attach: no MLflow run with id {run_id!r} at {uri}: {e}") from e
        return cls(client, run_id, run.info.experiment_id, uri)

    # -- protocol ----------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._call("params", self._client.log_batch, self._run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Buffer one value per metric at ``step`` (None: one past that metric's last auto step)."""
        checked = _check_metrics(metrics)
        ts = _now_ms()
        with self._lock:
            for name, value in checked.items():
                s = self._auto_step.get(name, 0) if step is None else int(step)
                self._auto_step[name] = s + 1
                self._append(name, value, s, ts)
        self._maybe_flush()

    def log_metric_series(
        self, name: str, values: Sequence[float], steps: Sequence[int] | None = None
    ) -> None:
        """Buffer a whole per-step history of one metric (steps default to 0..len-1)."""
        pairs = _check_series(name, values, steps)
        ts = _now_ms()
        with self._lock:
            for s, value in pairs:
                self._append(name, value, s, ts)
        self._maybe_flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._call("tags", self._client.log_batch, self._run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: no such file or directory: {path}")
        if path.is_dir():
            self._call(f"artifacts {path.name}", self._client.log_artifacts, self._run_id, str(path), artifact_path)
        else:
            self._call(f"artifact {path.name}", self._client.log_artifact, self._run_id, str(path), artifact_path)

    def log_figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib figure as ``figures/<name>`` (``.png`` added if no suffix)."""
        file = name if Path(name).suffix else f"{name}.png"
        self._call(f"figure {file}", self._client.log_figure, self._run_id, fig, f"figures/{file}")

    def child(self, name: str, **tags: Any) -> MLflowTracker:
        """A nested run in the same experiment (tag ``mlflow.parentRunId`` = this run)."""
        if self._gap_file is not None:  # a child that cannot be created is a gap of this run
            try:
                if self._missing:
                    raise trackstore.TrackingError(f"MLflow tracking store {self.tracking_uri}: unreachable earlier")
                return MLflowTracker.start(self._experiment_name(), name, tracking_uri=self.tracking_uri,
                                           parent_run_id=self._run_id, tags=tags, gap_file=self._gap_file)
            except trackstore.TrackingError as exc:
                self._gap(f"child run {name}", exc)
                return NullTracker(name)  # type: ignore[return-value]
        return MLflowTracker.start(
            self._experiment_name(), name, tracking_uri=self.tracking_uri, parent_run_id=self._run_id, tags=tags
        )

    def _experiment_name(self) -> str:
        with self._store_lock:
            return trackstore.call(self.tracking_uri, "reading the experiment",
                                   lambda: self._client.get_experiment(self.experiment_id).name)

    def log_dataset(self, path: str | Path, name: str, context: str) -> None:
        """The parquet file ``path`` as a dataset input of this run (MLflow's dataset tracking:
        name, digest of its content, schema, source; tag ``mlflow.data.context`` = ``context``,
        e.g. ``training`` or ``eval``): the runs table's "Datasets used" column."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        path = Path(path)
        with warnings.catch_warnings():  # MLflow 3.17 registers its local source twice, and says so
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(pd.read_parquet(path), source=str(path.resolve()), name=name)
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self._call(f"dataset {name}", self._client.log_inputs, self._run_id, datasets=[entity])

    def log_table(self, rows: Sequence[Mapping[str, Any]], name: str) -> None:
        """``rows`` (dicts with the same keys) as an MLflow table artifact ``name`` (.json): the
        UI's artifact view shows it as a table and ``mlflow.load_table`` reads it back."""
        columns = list(dict.fromkeys(k for r in rows for k in r))
        data = {c: [r.get(c) for r in rows] for c in columns}
        self._call(f"table {name}", self._client.log_table, self._run_id, data=data, artifact_file=name)

    def register_model(self, name: str, source: str, tags: Mapping[str, Any],
                       description: str = "") -> str | None:
        """A version of registered model ``name`` (created if missing) pointing at the model
        folder ``source``, made by this run, with ``tags``. No new version when the newest one
        has the same ``content_hash`` tag (a rerun that found the stage cached). Returns the
        version (the existing one in that case)."""
        str_tags = {str(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}
        return self._call(f"model version of {name}", self._register, name, source, str_tags, description)

    def _register(self, name: str, source: str, str_tags: dict[str, str], description: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(name, description=description or None)
        except MlflowException as e:  # already registered (by an earlier run)
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        versions = self._client.search_model_versions(f"name = '{name}'")
        newest = max(versions, key=lambda v: int(v.version), default=None)
        if newest is not None and str_tags.get("content_hash") and \
                newest.tags.get("content_hash") == str_tags["content_hash"]:
            return str(newest.version)
        version = self._client.create_model_version(name, source=source, run_id=self._run_id, tags=str_tags,
                                                    description=description or None)
        logger.info("MLflow: registered %s version %s (%s)", name, version.version, source)
        return str(version.version)

    def flush(self) -> None:
        """Send all buffered metrics, at most 1000 per ``log_batch`` call."""
        with self._lock:
            pending, self._buffer = self._buffer, []
        for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
            self._call(f"{len(pending[i : i + MAX_METRICS_PER_BATCH])} metric values", self._client.log_batch,
                       self._run_id, metrics=pending[i : i + MAX_METRICS_PER_BATCH])

    def end(self, status: str = "FINISHED") -> None:
        """Flush and mark the run terminated. A second call is a no-op. After a tracking gap the
        final status is tried once more, and left in the gap file when the store refuses it."""
        _check_status(status)
        if self._ended:
            return
        self._ended = True
        try:
            self.flush()
        finally:
            self._terminate(status)

    def _terminate(self, status: str) -> None:
        def close():
            if self._missing:
                self._client.set_tag(self._run_id, trackstore.GAP_TAG, _gap_text(self._missing))
            self._client.set_terminated(self._run_id, status=status)

        try:
            with self._store_lock:
                trackstore.call(self.tracking_uri, f"ending the run as {status}", close)
        except trackstore.TrackingError as exc:
            if self._gap_file is None:
                raise
            self._gap(f"status {status}", exc)
            trackstore.record_gap(self._gap_file, uri=self.tracking_uri, run_id=self._run_id, status=status,
                                  missing=self._missing, error=str(exc))
            logger.warning("MLflow run %s stays RUNNING until the store %s answers again; its status %s is kept "
                           "in %s and set by the next mopd run that reaches the store", self._run_id,
                           self.tracking_uri, status, self._gap_file)

    def _call(self, what: str, fn, *args, **kwargs):
        """One store call, retried (mopd.trackstore.call). With a gap file a failure is a gap: said
        once, and the store is not called again by this run (except to end it)."""
        if self._missing and self._gap_file is not None:
            self._missing.append(what)
            return None
        try:
            with self._store_lock:
                return trackstore.call(self.tracking_uri, f"logging {what}", lambda: fn(*args, **kwargs))
        except trackstore.TrackingError as exc:
            if self._gap_file is None:
                raise
            self._gap(what, exc)
            return None

    def _gap(self, what: str, exc: BaseException) -> None:
        if not self._missing:
            msg = (f"tracking gap: {exc}. The stage goes on; what it would log to MLflow run {self._run_id} "
                   f"from here is not logged (docs/tracking.md, \"When the tracking store fails\")")
            logger.warning(msg)
            print(f"warning: {msg}", file=sys.stderr, flush=True)
        self._missing.append(what)

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    # -- internals ---------------------------------------------------------------------------

    def _append(self, name: str, value: float, step: int, ts: int) -> None:
        from mlflow.entities import Metric

        self._buffer.append(Metric(name, value, ts, step))

    def _maybe_flush(self) -> None:
        if len(self._buffer) >= MAX_METRICS_PER_BATCH:
            self.flush()
