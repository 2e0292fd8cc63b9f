"""A stage's Result: a small frozen record of its output files, their sha256 and headline metrics.

Stages exchange files, not objects. The Result is what Prefect persists (as JSON, never weights)
and what the next stage's cache key is computed from. ``result.json`` sits in the stage's output
directory, so DVC's ``outs`` and Prefect's record describe the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
MODELS_FILE = "models.json"  # in a model stage's output: {method label: model dir inside it}
# a stage's headline metrics (result.json's, less run-varying timings): dvc.yaml's top-level
# `metrics`, so `dvc metrics show/diff` and `dvc exp show` list them
METRICS_FILE = "metrics.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(out_dir: Path, skip: str = RESULT_FILE) -> dict[str, str]:
    """sha256 of every file under ``out_dir`` (except the record ``skip``), keyed by relative path."""
    return {
        str(p.relative_to(out_dir)): sha256_file(p)
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and p.name != skip
    }


@dataclass(frozen=True)
class Result:
    stage: str
    out_dir: str  # relative to the project directory
    files: dict[str, str]  # relative path (inside out_dir) -> sha256
    metrics: dict[str, float] = field(default_factory=dict)
    cache_key: str | None = None
    # what the cache key was made of (mopd.graph.key_inputs): lets `mopd plan` say what changed
    inputs: dict[str, Any] | None = None
    # where it ran (mopd.placement): devices leased, host, lease and end times. Run-varying, so
    # never in result.json (DVC hashes it): kept in the run record (load_run_record)
    placement: dict[str, Any] | None = None

    @property
    def content_hash(self) -> str:
        """One hash of all output files: what downstream cache keys depend on."""
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Result":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def problems(self, project_dir: Path) -> list[str]:
        """Why these outputs cannot be trusted any more (missing, changed or unrecorded files); []
        if intact."""
        base = project_dir / self.out_dir
        out = []
        if base.is_dir():  # a file the record does not list (DVC would see the folder changed)
            extra = sorted(str(p.relative_to(base)) for p in base.rglob("*")
                           if p.is_file() and p.name != RESULT_FILE and str(p.relative_to(base)) not in self.files)
            out += [f"{base / rel}: not in the record (added since)" for rel in extra[:5]]
        for rel, digest in self.files.items():
            path = base / rel
            if not path.is_file():
                out.append(f"{path}: missing")
            elif sha256_file(path) != digest:
                out.append(f"{path}: changed since it was recorded")
        return out


class RecordError(ValueError):
    """A result.json that is not a record of the expected shape (damaged, edited, another
    format): its stage is not done, and runs again."""


def write_result(out_dir: Path, result: Result) -> None:
    """result.json, written to a temporary file and renamed into place: a kill leaves the old
    record or the new one, never half of one."""
    tmp = out_dir / f".{RESULT_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / RESULT_FILE)


RUNS_DIR = Path(".mopd") / "runs"  # per stage: where and how long its last computation ran


def run_record_path(project: Path, stage: str) -> Path:
    return Path(project) / RUNS_DIR / (stage.replace(":", "__") + ".json")


def write_run_record(project: Path, stage: str, record: dict[str, Any]) -> None:
    """What varies from run to run of a stage (placement, timings): beside the project's state,
    outside the output folder DVC hashes, so a recomputation with the same content leaves
    ``result.json`` (and ``dvc.lock``) unchanged."""
    path = run_record_path(project, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_run_record(project: Path, stage: str) -> dict[str, Any] | None:
    """The last computation's run record of ``stage`` (None when there is none or it is unreadable:
    it is information, never a reason to recompute)."""
    try:
        data = json.loads(run_record_path(project, stage).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_record(data: Any) -> None:
    """Raise RecordError unless ``data`` has result.json's shape (the fields every reader uses)."""
    if not isinstance(data, dict):
        raise RecordError(f"top level is a {type(data).__name__}, not a mapping")
    for name, types, required in (("stage", str, True), ("out_dir", str, True), ("files", dict, True),
                                  ("metrics", dict, False), ("cache_key", (str, type(None)), False),
                                  ("inputs", (dict, type(None)), False), ("placement", (dict, type(None)), False)):
        if required and name not in data:
            raise RecordError(f"no {name!r}")
        if name in data and not isinstance(data[name], types):
            raise RecordError(f"{name!r} is a {type(data[name]).__name__}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data["files"].items()):
        raise RecordError("'files' must map file names to sha256 strings")
    if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
               for k, v in (data.get("metrics") or {}).items()):
        raise RecordError("'metrics' must map names to numbers")


def load_result(out_dir: Path) -> Result:
    """The stage's record. FileNotFoundError when there is none; RecordError (a ValueError)
    naming the file when it is not a readable record of the expected shape."""
    path = out_dir / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no result; run the stage that produces {out_dir} first")
    try:
        data = json.loads(path.read_text())
        _check_record(data)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RecordError(f"{path}: record unreadable: {exc}") from None
    return Result.from_dict(data)
