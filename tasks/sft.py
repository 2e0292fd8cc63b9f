"""Stage `sft`: the Stage-1 student, fine-tuned on every domain's gold completions (TRL SFT)."""

from __future__ import annotations

from typing import TYPE_CHECKING
import random
from pathlib import Path

from mopd.artifacts import Result, finalize
from mopd.checkpoint import stage_checkpoint
from mopd.data import read_split
from mopd.trainers.sft import train_sft
from tasks.plotting import log_curves

if TYPE_CHECKING:  # the root configuration belongs to the runner (tasks.cli)
    from mopd.config import Config


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker) -> Result:
    """SFT of the base model on the pooled training records of all domains."""
    records = [r for d in cfg.domains for r in read_split(inputs["data"], d, "train")]
    random.Random(cfg.params.seed).shuffle(records)
    history = train_sft(inputs["base"] / "model", records, out_dir, cfg.params.sft,
                        cfg.params.seed, tracker, **stage_checkpoint(cfg.project_dir, "sft"))
    log_curves(tracker, history, "SFT")
    metrics = {"final_loss": history["train/loss"][-1][1]} if history.get("train/loss") else {}
    return finalize("sft", cfg.project_dir, out_dir, metrics)


if __name__ == "__main__":
    from tasks.cli import main

    raise SystemExit(main("sft", run))
