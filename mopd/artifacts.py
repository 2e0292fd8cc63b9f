"""A stage's Result: a small frozen record of its output files, their sha256 and headline metrics.

Stages exchange files, not objects. The Result is what Prefect persists (as JSON, never weights)
and what the next stage's cache key is computed from. ``result.json`` sits in the stage's output
directory, so DVC's ``outs`` and Prefect's record describe the same files.
"""

from __future__ import annotations

import hashlib
import json
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


def hash_tree(out_dir: Path) -> dict[str, str]:
    """sha256 of every file under ``out_dir`` (except result.json), keyed by relative path."""
    return {
        str(p.relative_to(out_dir)): sha256_file(p)
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and p.name != RESULT_FILE
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
    # where it ran (mopd.placement): devices leased, host, lease and end times; not hashed
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
        """Why these outputs cannot be trusted any more (missing or changed files); [] if intact."""
        base = project_dir / self.out_dir
        out = []
        for rel, digest in self.files.items():
            path = base / rel
            if not path.is_file():
                out.append(f"{path}: missing")
            elif sha256_file(path) != digest:
                out.append(f"{path}: changed since it was recorded")
        return out


def write_result(out_dir: Path, result: Result) -> None:
    (out_dir / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")


def load_result(out_dir: Path) -> Result:
    path = out_dir / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no result; run the stage that produces {out_dir} first")
    return Result.from_dict(json.loads(path.read_text()))
