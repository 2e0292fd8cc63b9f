"""`python -m mopd.launch tasks.<kind> [stage arguments]`: DVC's command for a stage that runs
data-parallel (`dvc.yaml` is generated with it). It reads `runtime.processes` (the stage kind's
count) and `runtime.accelerate_config` from the project's params.yaml *when it runs*, leases the
stage's devices (mopd.placement) and starts the stage module under `accelerate launch` — or in one
process — exactly as the flow, `mopd run` and `mopd stage` do; so
`dvc exp run -S runtime.processes=4` runs four processes. Returns the stage's exit status."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from mopd.config import ConfigError, load_config
from mopd.graph import KINDS
from mopd.placement import PlacementError, leased, wanted
from mopd.runtime import launch_prefix


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m mopd.launch tasks.<kind> [stage arguments]", file=sys.stderr)
        return 2
    module, rest = argv[0], argv[1:]
    kinds = [k for k, row in KINDS.items() if row.module == module]
    if not kinds:
        print(f"error: {module!r} is no stage module (known: {sorted(r.module for r in KINDS.values())})",
              file=sys.stderr)
        return 2
    row = KINDS[kinds[0]]
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--pipeline", default="full")
    known, _ = parser.parse_known_args(rest)
    try:
        rt = load_config(known.project_dir, pipeline=known.pipeline).params.runtime
        processes = rt.processes_for(row.kind) if row.data_parallel else 1
        prefix = launch_prefix(processes, rt.accelerate_config, known.project_dir) or [sys.executable, "-m"]
        need = wanted(rt.devices_per_stage, row.kind, runs_models="gpu" in row.tags, processes=processes)
        with leased(need, f"{module} (dvc)") as lease:
            env = {**os.environ, **(lease.env() if lease else {})}
            return subprocess.run([*prefix, module, *rest], env=env).returncode
    except (ConfigError, PlacementError, FileNotFoundError) as exc:
        print(f"error: {module}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
