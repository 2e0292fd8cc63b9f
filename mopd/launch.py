"""`python -m mopd.launch tasks.<kind> [stage arguments]`: DVC's command for a stage that runs
data-parallel (`dvc.yaml` is generated with it). It reads `runtime.processes` (the stage kind's
count) and `runtime.accelerate_config` from the project's params.yaml *when it runs*, leases the
stage's devices (mopd.placement) and starts the stage module under `accelerate launch` — or in one
process — exactly as the flow, `mopd run` and `mopd stage` do; so
`dvc exp run -S runtime.processes=4` runs four processes. On each node of a multi-node stage
(mopd.cluster) it builds that node's share of the launch. Returns the stage's exit status."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from mopd.config import ConfigError, load_config
from mopd.graph import KINDS
from mopd.local_run import devices_for, launcher
from mopd.overrides import OverrideError, parse_set
from mopd.placement import PlacementError, current, leased


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
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    known, _ = parser.parse_known_args(rest)
    try:  # the stage's own settings, overrides included (`runtime.processes` may be one)
        cfg = load_config(known.project_dir, pipeline=known.pipeline, overrides=parse_set(known.overrides))
        # a cluster engine placed this process already (its devices, its node): no host lease
        wanted = 0 if current() is not None else devices_for(cfg, row)
        with leased(wanted, f"{module} (dvc)") as lease:
            env = {**os.environ, **(lease.env() if lease else {})}
            return subprocess.run([*launcher(cfg, row, known.project_dir), module, *rest], env=env).returncode
    except (ConfigError, OverrideError, PlacementError, FileNotFoundError) as exc:
        print(f"error: {module}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
