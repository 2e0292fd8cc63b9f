"""Stage `sft`: the Stage-1 student, fine-tuned on every domain's gold completions (TRL SFT)."""

from __future__ import annotations

import random

from mopd.artifacts import Result
from mopd.data import read_split
from mopd.stage import StageContext
from mopd.trainers.sft import train_sft
from tasks.plotting import log_curves


def run(ctx: StageContext) -> Result:
    """SFT of the base model on the pooled training records of all domains."""
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    records = [r for d in cfg.domains for r in read_split(ctx.role("data"), d, "train")]
    random.Random(cfg.params.seed).shuffle(records)
    history = train_sft(ctx.role("base") / "model", records, out_dir, cfg.params.sft,
                        cfg.params.seed, tracker, fmt=ctx.prompt_format, **ctx.checkpoint)
    log_curves(tracker, history, "SFT", out_dir)
    metrics = {"final_loss": history["train/loss"][-1][1]} if history.get("train/loss") else {}
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("sft", run))
