"""Deployments on a Prefect work pool: `mopd/<pipeline>` for every pipeline of pipelines.yaml, run
by a worker that polls the pool (`make worker`, i.e. `prefect worker start --pool mopd`) instead of
the process that serves them (flows/serve.py). `prefect deployment run mopd/full` from any machine
that reaches the Prefect API then runs on the worker's machine, or — a Kubernetes pool — as a job
on the cluster.

    python -m flows.deploy [--pool mopd] [--type process|kubernetes] [--base-job-template FILE]

The pool is created when missing: ``process`` (flow runs as subprocesses of the worker) by
default; ``kubernetes`` with ``--base-job-template`` (e.g. containers/k8s/gpu-job-template.json:
the flow-run pod asks for ``nvidia.com/gpu``), which needs the `prefect-kubernetes` worker. The
flow's code is this checkout (``from_source``: the worker loads `flows/mopd_flow.py:mopd` from it,
so it must see the same path: the same machine, a shared filesystem or the image); the project
directory is a deployment parameter the worker's ``MOPD_PROJECT_ROOTS`` must allow.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from flows.serve import deployments, ensure_gpu_limit

CODE_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/mopd_flow.py:mopd"


def ensure_pool(name: str, kind: str, template: Path | None = None) -> None:
    """Create work pool ``name`` of type ``kind`` unless it exists (Prefect's own CLI, which takes
    the worker type's default job template, or ``template``)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            pool = None
    if pool is not None:
        if pool.type != kind:
            raise SystemExit(f"work pool {name!r} exists with type {pool.type!r}, not {kind!r}")
        return
    cmd = [sys.executable, "-m", "prefect", "work-pool", "create", name, "--type", kind]
    if template is not None:
        cmd += ["--base-job-template", str(template)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def deploy(project: Path, pool: str) -> list[str]:
    """One deployment per pipeline on ``pool``, the flow loaded from this checkout; their ids."""
    from flows.mopd_flow import mopd

    source = mopd.from_source(source=str(CODE_ROOT), entrypoint=ENTRYPOINT)
    ids = []
    for d in deployments(project):  # validates every pipeline's configuration first
        ids.append(str(source.deploy(name=d.name, work_pool_name=pool, parameters=d.parameters,
                                     description=d.description, tags=d.tags, print_next_steps=False)))
    return ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", default="mopd", help="work pool name (default mopd)")
    ap.add_argument("--type", default="process", choices=["process", "kubernetes"], dest="kind")
    ap.add_argument("--base-job-template", type=Path, default=None,
                    help="the pool's job template when it is created (kubernetes: containers/k8s/...)")
    args = ap.parse_args(argv)
    project = Path(os.environ.setdefault("MOPD_PROJECT_DIR", str(Path.cwd()))).resolve()
    ensure_gpu_limit(int(os.environ.get("MOPD_GPU_SLOTS", "2")))
    ensure_pool(args.pool, args.kind, args.base_job_template)
    ids = deploy(project, args.pool)
    print(f"{len(ids)} deployment(s) on work pool {args.pool!r}; start a worker: prefect worker start --pool "
          f"{args.pool}  (then: prefect deployment run mopd/<pipeline>)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
