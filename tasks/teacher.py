"""Stage `teacher:<domain>`: one RL teacher per domain, GRPO from the SFT checkpoint with the
domain's verifier as reward (MOPD 3.1). Teachers are independent: one failing stops no other."""

from __future__ import annotations

from typing import TYPE_CHECKING
from pathlib import Path

from mopd.artifacts import Result, finalize
from mopd.checkpoint import stage_checkpoint
from mopd.settings.multiround import MultiRoundParams
from mopd.data import read_split
from mopd.trainers.grpo import train_grpo
from tasks.plotting import log_curves, reward_quarters

if TYPE_CHECKING:  # the root configuration belongs to the runner (tasks.cli)
    from mopd.config import Config


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker, *, domain: str,
        round: str | None = None) -> Result:
    """GRPO of the SFT model on ``domain``'s training prompts (multi-round MOPD, round r >= 2:
    of round r-1's student instead, MOPD §4.4.3)."""
    records = read_split(inputs["data"], domain, "train")
    kind = cfg.domain(domain).verifier
    init = inputs["sft"] if round is None else inputs[MultiRoundParams.student_stage(int(round) - 1)]
    name = f"round_teacher:{round}:{domain}" if round else f"teacher:{domain}"
    history = train_grpo(init / "model", records, kind, out_dir, cfg.params.teacher[domain], cfg.params.seed,
                         tracker, **stage_checkpoint(cfg.project_dir, name))
    log_curves(tracker, history, f"teacher {domain}" + (f" round {round}" if round else ""))
    metrics = reward_quarters(history)
    return finalize(name, cfg.project_dir, out_dir, metrics)


if __name__ == "__main__":
    from tasks.cli import main

    raise SystemExit(main("teacher", run))
