"""Stage `teacher:<domain>`: one RL teacher per domain, GRPO from the SFT checkpoint with the
domain's verifier as reward (MOPD 3.1). Teachers are independent: one failing stops no other."""

from __future__ import annotations

from mopd.artifacts import Result
from mopd.data import read_split
from mopd.stage import StageContext
from mopd.trainers.grpo import rollout_budget, train_grpo
from tasks.plotting import log_curves, reward_quarters


def run(ctx: StageContext) -> Result:
    """GRPO of the SFT model on ``domain``'s training prompts (multi-round MOPD, round r >= 2:
    of round r-1's student instead, MOPD §4.4.3)."""
    cfg, domain, round = ctx.cfg, ctx.args["domain"], ctx.args.get("round")
    records = read_split(ctx.role("data"), domain, "train")
    kind = cfg.domain(domain).verifier
    history = train_grpo(ctx.role("student") / "model", records, kind, ctx.out_dir, cfg.params.teacher[domain],
                         cfg.params.seed, ctx.tracker, fmt=ctx.prompt_format, **ctx.checkpoint)
    log_curves(ctx.tracker, history, f"teacher {domain}" + (f" round {round}" if round else ""), ctx.out_dir)
    return ctx.result(reward_quarters(history) | rollout_budget(history, cfg.params.teacher[domain].batch_size))


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("teacher", run))
