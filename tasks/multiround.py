"""Stage `multiround:<r>` (multi-round MOPD, MOPD §4.4.3; ALGORITHMS §9): MOPD again, from round
r-1's student, over the `multiround.domains`, each routed to its round-r teacher. The computation
is `tasks.distill`'s with the `distill` section; this module gives it its own command line."""

from __future__ import annotations

from mopd.artifacts import Result
from mopd.stage import StageContext
from tasks.distill import run as run_distill


def run(ctx: StageContext) -> Result:
    """Round ``round`` of MOPD."""
    return run_distill(ctx)  # its student and teachers are the stage table's roles for the round


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("multiround", run))
