"""Stage `round_teacher:<r>:<domain>` (multi-round MOPD, MOPD §4.4.3; ALGORITHMS §9): the
domain's GRPO teacher of round r, trained from round r-1's student with the `teacher.<domain>`
recipe. The computation is `tasks.teacher`'s; this module gives it its own command line."""

from __future__ import annotations

from mopd.artifacts import Result
from mopd.stage import StageContext
from tasks.teacher import run as run_teacher


def run(ctx: StageContext) -> Result:
    """GRPO of round ``round - 1``'s student on ``domain``'s training prompts."""
    return run_teacher(ctx)  # its student (round - 1's) is the `student` role of the stage table


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("round_teacher", run))
