"""Stage `cascade_rl:<domain>`: one step of the Cascade RL baseline (ALGORITHMS §9): GRPO on
``domain`` (its `teacher.<domain>` recipe and verifier) from the previous step's model. The
first domain's step is `teacher:<first>` itself (GRPO of SFT with that recipe and seed), so the
stage table starts the cascade at the second domain; the last step's model is `cascade_rl`."""

from __future__ import annotations

from typing import TYPE_CHECKING
from pathlib import Path

from mopd.artifacts import Result, finalize
from mopd.checkpoint import stage_checkpoint
from mopd.data import read_split
from mopd.trainers.grpo import train_grpo
from tasks.plotting import log_curves, reward_quarters

if TYPE_CHECKING:  # the root configuration belongs to the runner (tasks.cli)
    from mopd.config import Config


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker, *, domain: str) -> Result:
    order = cfg.cascade_order
    i = order.index(domain)
    prev, = (path for name, path in inputs.items() if name != "data")  # the stage table's previous step
    records = read_split(inputs["data"], domain, "train")
    history = train_grpo(prev / "model", records, cfg.domain(domain).verifier, out_dir,
                         cfg.params.teacher[domain], cfg.params.seed, tracker,
                         **stage_checkpoint(cfg.project_dir, f"cascade_rl:{domain}"))
    log_curves(tracker, history, f"Cascade RL step {i + 1}/{len(order)}: {domain}")
    metrics = reward_quarters(history)
    return finalize(f"cascade_rl:{domain}", cfg.project_dir, out_dir, metrics)


if __name__ == "__main__":
    from tasks.cli import main

    raise SystemExit(main("cascade_rl", run))
