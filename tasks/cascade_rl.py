"""Stage `cascade_rl:<domain>`: one step of the Cascade RL baseline (ALGORITHMS §9): GRPO on
``domain`` (its `teacher.<domain>` recipe and verifier) from the previous step's model. The
first domain's step is `teacher:<first>` itself (GRPO of SFT with that recipe and seed), so the
stage table starts the cascade at the second domain; the last step's model is `cascade_rl`."""

from __future__ import annotations

from mopd.artifacts import Result
from mopd.data import read_split
from mopd.settings.baselines import CascadeRLParams
from mopd.stage import StageContext
from mopd.trainers.grpo import rollout_budget, train_grpo
from tasks.plotting import log_curves, reward_quarters


def run(ctx: StageContext) -> Result:
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    domain = ctx.args["domain"]
    section: CascadeRLParams = cfg.params.cascade_rl  # its order (or the local teachers')
    order = section.order or cfg.local_teacher_domains
    i = order.index(domain)
    prev = ctx.role("student")  # the previous step of the cascade (the stage table says which)
    records = read_split(ctx.role("data"), domain, "train")
    history = train_grpo(prev / "model", records, cfg.domain(domain).verifier, out_dir,
                         cfg.params.teacher[domain], cfg.params.seed, tracker,
                         fmt=ctx.prompt_format, **ctx.checkpoint)
    log_curves(tracker, history, f"Cascade RL step {i + 1}/{len(order)}: {domain}", out_dir)
    metrics = reward_quarters(history) | rollout_budget(history, cfg.params.teacher[domain].batch_size)
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("cascade_rl", run))
