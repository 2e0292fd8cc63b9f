"""Keep DVC's lock in step with Prefect runs.

After a flow run, the stages that completed (computed or cached, outputs intact) are recorded in
`dvc.lock` with `dvc commit --force`, so `dvc status` and `dvc repro` agree with what Prefect
already built instead of calling every stage stale. Only for the `full` pipeline (the one
`dvc.yaml` describes) and only inside a DVC repository.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)
DVC_PIPELINE = "full"


def dvc_name(stage: str) -> str:
    """Prefect/graph stage name -> dvc.yaml stage name (`teacher:math` -> `teacher@math`)."""
    return stage.replace(":", "@")


def sync_lock(project: Path, pipeline: str, completed: list[str]) -> str:
    """Record ``completed`` stages in dvc.lock; returns what happened, in words."""
    if pipeline != DVC_PIPELINE or not (project / ".dvc").is_dir() or not (project / "dvc.yaml").is_file():
        return "skipped (not a DVC repository, or not the pipeline dvc.yaml describes)"
    dvc = Path(sys.executable).parent / "dvc"
    exe = str(dvc) if dvc.exists() else shutil.which("dvc")
    if not exe or not completed:
        return "skipped (no dvc executable or nothing completed)"
    cmd = [exe, "commit", "--force", "--quiet", *[dvc_name(s) for s in completed]]
    proc = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("dvc commit failed (%s): %s", proc.returncode, proc.stderr.strip()[-500:])
        return f"failed: {proc.stderr.strip()[-300:]}"
    return f"committed {len(completed)} stage(s) to dvc.lock"
