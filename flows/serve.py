"""Serve one deployment per pipeline of pipelines.yaml: `mopd/<pipeline>` (flow `mopd`),
`prefect deployment run mopd/full` being the main entry.

Needs a Prefect API (`PREFECT_API_URL`, e.g. the local server `make demo` starts). Creates the
`gpu` tag concurrency limit (default 2, `MOPD_GPU_SLOTS`) so at most that many training stages
(teachers, SFT, distillation, evaluation) run at once, whatever the task runner's parallelism.
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.mopd_flow import mopd
from mopd.config import PIPELINES_FILE, load_config, load_pipelines

GPU_TAG = "gpu"


def ensure_gpu_limit(slots: int) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=slots)


def deployments(project: Path) -> list:
    """One deployment per pipeline of the project's pipelines.yaml (each pipeline's configuration
    is validated first: a broken file fails here, not in the first run)."""
    names = list(load_pipelines(project / PIPELINES_FILE).pipelines)
    cfg = None
    for name in names:
        cfg = load_config(project, pipeline=name)
    out = []
    for name, pipe in cfg.pipelines.pipelines.items():
        out.append(mopd.to_deployment(
            name=name, parameters={"pipeline": name, "project_dir": str(project)},
            description=f"Pipeline {name!r} of pipelines.yaml: domains {pipe.domains}, stages "
                        f"{pipe.stages}.",
            tags=["mopd", f"pipeline:{name}"]))
    return out


def main() -> None:
    from prefect import serve

    project = Path(os.environ.setdefault("MOPD_PROJECT_DIR", str(Path.cwd()))).resolve()
    ensure_gpu_limit(int(os.environ.get("MOPD_GPU_SLOTS", "2")))
    serve(*deployments(project))


if __name__ == "__main__":
    main()
