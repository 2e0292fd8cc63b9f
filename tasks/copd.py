"""Stages `copd:<cycle>:<phase>:<branch>`: one phase of one CoPD branch in one cycle (ALGORITHMS §6;
CoPD §3.3, Algorithm 1). Phase I (`rl`): `copd.rl_steps` GRPO steps on the branch's domain with
its `teacher.<domain>` recipe, from the branch's previous cycle (cycle 1: SFT). Phase II (`opd`):
`copd.opd_steps` mutual-OPD steps (`mopd.trainers.copd`) with the exchange partners' Phase I
weights of the same cycle as teachers. Each is cached on its own: a failure in cycle n reruns
only cycle n onward."""

from __future__ import annotations

from mopd.artifacts import Result
from mopd.data import read_split
from mopd.stage import StageContext
from mopd.teachers.ledger import history_totals
from tasks.plotting import log_curves, reward_quarters


def run(ctx: StageContext) -> Result:
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    cycle = ctx.args["cycle"]
    phase = ctx.args["phase"]
    domain = ctx.args["domain"]
    n, c = int(cycle), cfg.params.copd
    name = f"copd:{n}:{phase}:{domain}"
    records = read_split(ctx.role("data"), domain, "train")
    kind = cfg.domain(domain).verifier
    # a distinct sampling stream per cycle (the same seed would replay cycle 1's prompt order)
    seed = cfg.params.seed + 7919 * (n - 1)
    if phase == "rl":
        from mopd.trainers.grpo import rollout_budget, train_grpo

        init = ctx.role("student")  # SFT in cycle 1, else the branch's Phase II of cycle n-1
        recipe = cfg.params.teacher[domain].model_copy(update={"max_steps": c.rl_steps})
        history = train_grpo(init / "model", records, kind, out_dir, recipe, seed, tracker,
                             fmt=ctx.prompt_format, **ctx.checkpoint)
        log_curves(tracker, history, f"CoPD cycle {n} Phase I (GRPO): {domain}", out_dir)
        return ctx.result(reward_quarters(history) | rollout_budget(history, recipe.batch_size))
    if phase != "opd":
        raise ValueError(f"stage {name}: phase must be 'rl' or 'opd', got {phase!r}")
    from mopd.opd.fidelity import fidelity_gate
    from mopd.trainers.copd import train_copd_opd
    from mopd.verifiers import verify_batch

    partners = {j: path / "model" for j, path in ctx.roles_of("partners").items()}  # their Phase I, cycle n
    prompts = {domain: records} | {j: read_split(ctx.role("data"), j, "train") for j in partners}

    def score(texts, refs):
        return [v.reward for v in verify_batch([kind] * len(texts), texts, refs)]

    tracker.log_params({"copd/partners": ",".join(sorted(partners)), "copd/cycle": n})
    fidelity_gate(ctx.role("student") / "model", dict(partners), ctx.prompt_format,
                  [prompts[d][0]["prompt"] for d in sorted(prompts)], tracker, seed=seed)
    history = train_copd_opd(ctx.role("student") / "model", partners, prompts, domain, score,
                             out_dir, c.opd, c.opd_steps, seed, tracker, fmt=ctx.prompt_format)
    log_curves(tracker, history, f"CoPD cycle {n} Phase II (mutual OPD): {domain} <- {sorted(partners)}", out_dir)
    metrics = {}
    for key in ("copd/native_reward", *(f"copd/reverse_kl_to_{j}" for j in partners)):
        vals = [v for _, v in history[key]]
        q = max(1, len(vals) // 4)
        short = key.split("/")[-1]
        metrics |= {f"{short}_first_quarter": sum(vals[:q]) / q, f"{short}_last_quarter": sum(vals[-q:]) / q}
    metrics |= history_totals(history, "copd/trained_tokens")  # scoring by the partners (mopd.teachers.ledger)
    per_step = c.opd.native_prompts * c.opd.group_size + len(partners) * c.opd.cross_prompts * c.opd.cross_samples
    metrics |= {"budget/student_rollouts": float(per_step * len(history["copd/trained_tokens"])),
                "budget/student_tokens": float(sum(v for _, v in history["copd/trained_tokens"]))}
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("copd", run))
