"""Stage `mix_rl`: the Mix-RL baseline (MOPD Table 2; ALGORITHMS §9): one GRPO run from the SFT
student on the pooled training prompts of every domain, each prompt rewarded by its own
domain's verifier, the domains in fixed ratios within every step's batch."""

from __future__ import annotations

from collections import Counter

from mopd.artifacts import Result
from mopd.data import read_split
from mopd.settings.baselines import MixRLParams
from mopd.stage import StageContext
from mopd.trainers.grpo import mixed_schedule, rollout_budget, train_grpo
from tasks.plotting import log_curves, reward_quarters


def run(ctx: StageContext) -> Result:
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    params: MixRLParams = cfg.params.mix_rl
    domains = cfg.domains
    weights = params.domain_weights or {d: 1 / len(domains) for d in domains}
    records = {d: [{**r, "kind": cfg.domain(d).verifier, "domain": d}
                   for r in read_split(ctx.role("data"), d, "train")] for d in domains}
    per_step = params.batch_size // params.num_generations
    stream = mixed_schedule(records, weights, per_step, params.max_steps, cfg.params.seed)
    counts = Counter(r["domain"] for r in stream)
    tracker.log_params({f"mix_rl/prompts_{d}": counts[d] for d in domains})
    history = train_grpo(ctx.role("student") / "model", stream, None, out_dir, params, cfg.params.seed,
                         tracker, fmt=ctx.prompt_format, ordered=True, **ctx.checkpoint)
    log_curves(tracker, history, "Mix-RL", out_dir)
    metrics = ({f"prompts_{d}": float(counts[d]) for d in domains} | reward_quarters(history)
               | rollout_budget(history, params.batch_size))
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("mix_rl", run))
