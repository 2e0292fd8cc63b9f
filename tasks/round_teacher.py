"""Stage `round_teacher:<r>:<domain>` (multi-round MOPD, MOPD §4.4.3; ALGORITHMS §9): the
domain's GRPO teacher of round r, trained from round r-1's student with the `teacher.<domain>`
recipe. The computation is `tasks.teacher`'s; this module gives it its own command line."""

from __future__ import annotations

from typing import TYPE_CHECKING
from pathlib import Path

from mopd.artifacts import Result
from tasks.teacher import run as run_teacher

if TYPE_CHECKING:  # the root configuration belongs to the runner (tasks.cli)
    from mopd.config import Config


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker, *, round: str, domain: str) -> Result:
    """GRPO of round ``round - 1``'s student on ``domain``'s training prompts."""
    return run_teacher(cfg, inputs, out_dir, tracker, domain=domain, round=round)


if __name__ == "__main__":
    from tasks.cli import main

    raise SystemExit(main("round_teacher", run))
