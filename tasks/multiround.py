"""Stage `multiround:<r>` (multi-round MOPD, MOPD §4.4.3; ALGORITHMS §9): MOPD again, from round
r-1's student, over the `multiround.domains`, each routed to its round-r teacher. The computation
is `tasks.distill`'s with the `distill` section; this module gives it its own command line."""

from __future__ import annotations

from typing import TYPE_CHECKING
from pathlib import Path

from mopd.artifacts import Result
from tasks.distill import run as run_distill

if TYPE_CHECKING:  # the root configuration belongs to the runner (tasks.cli)
    from mopd.config import Config


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker, *, round: str) -> Result:
    """Round ``round`` of MOPD."""
    return run_distill(cfg, inputs, out_dir, tracker, round=round)


if __name__ == "__main__":
    from tasks.cli import main

    raise SystemExit(main("multiround", run))
