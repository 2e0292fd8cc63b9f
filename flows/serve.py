"""Serve the `mopd/full` deployment (flow `mopd`, deployment `full`) from this process.

Needs a Prefect API (`PREFECT_API_URL`, e.g. the local server `make demo` starts). Creates the
`gpu` tag concurrency limit (default 2, `MOPD_GPU_SLOTS`) so at most that many training stages
(teachers, SFT, distillation) run at once, whatever the task runner's parallelism.
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.mopd_flow import mopd

GPU_TAG = "gpu"


def ensure_gpu_limit(slots: int) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=slots)


def main() -> None:
    project = Path(os.environ.setdefault("MOPD_PROJECT_DIR", str(Path.cwd()))).resolve()
    ensure_gpu_limit(int(os.environ.get("MOPD_GPU_SLOTS", "2")))
    mopd.serve(
        name="full",
        parameters={"pipeline": "full", "project_dir": str(project)},
        description="The whole post-training DAG: data, base, SFT, per-domain GRPO teachers, "
                    "MOPD distillation, mergekit baselines, evaluation.",
        tags=["mopd"],
    )


if __name__ == "__main__":
    main()
