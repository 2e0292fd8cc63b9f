"""Stage `copd_monitor`: CoPD's between-branch monitor (ALGORITHMS §6; CoPD §4.3, Figure 4):
for every exchange pair and every training point (SFT, then each cycle's Phase I and Phase II),
the top-k overlap and the symmetric KL of the two branches along each one's rollouts on the
other's prompts (the states Phase II distils on). CSV + PNG, and MLflow metrics with the point as
the step, so the MLflow UI draws the same curves. Also the weight-shift analysis (M2RL 3.3) of the
final branches against SFT: changed-weight Jaccard per pair and parameter group beside the
random-mask reference, as the `weight_shift` stage does for the teachers."""

from __future__ import annotations

import random

import pandas as pd

from mopd.analysis import divergence_along_rollouts
from mopd.artifacts import Result
from mopd.data import read_split
from mopd.metrics import weight_shift_pairs
from mopd.models import load_model, load_tokenizer
from mopd.plots import phase_lines, weight_shift_chart
from mopd.settings.copd import CoPDParams
from mopd.stage import StageContext


def run(ctx: StageContext) -> Result:
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    c: CoPDParams = cfg.params.copd
    rng = random.Random(cfg.params.seed)
    prompts = {}
    for d in cfg.copd_branches:
        recs = read_split(ctx.role("data"), d, "train")
        prompts[d] = [r["prompt"] for r in rng.sample(recs, min(c.monitor_prompts, len(recs)))]
    points = [(0, "SFT", {d: ctx.role("student") for d in cfg.copd_branches})]
    for n in range(1, c.cycles + 1):
        for phase in ("rl", "opd"):
            points.append((len(points), f"{n}:{phase.upper()}",
                           {d: ctx.roles_of("phases")[f"{n}:{phase}:{d}"] for d in cfg.copd_branches}))
    pairs = sorted({tuple(sorted(p)) for p in cfg.copd_pairs()})
    tokenizer = load_tokenizer(ctx.role("student") / "model")
    rows = []
    for point, label, dirs in points:
        models = {d: load_model(dirs[d] / "model") for d in cfg.copd_branches}
        for a, b in pairs:
            both = [divergence_along_rollouts(models[x], models[y], tokenizer, prompts[y], fmt=ctx.prompt_format,
                                              max_new_tokens=c.opd.max_new_tokens, temperature=c.opd.temperature,
                                              seed=cfg.params.seed + point, k=c.monitor_topk)
                    for x, y in ((a, b), (b, a))]
            tokens = sum(r["tokens"] for r in both)
            row = {"point": point, "label": label, "pair": f"{a}-{b}", "tokens": tokens}
            for key in ("topk_overlap", "symmetric_kl"):
                row[key] = sum(r[key] * r["tokens"] for r in both) / tokens
            rows.append(row)
            tracker.log_metrics({f"copd/topk_overlap/{a}-{b}": row["topk_overlap"],
                                 f"copd/symmetric_kl/{a}-{b}": row["symmetric_kl"]}, step=point)
    table = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "monitor.csv", index=False)
    fig = phase_lines(table, ["topk_overlap", "symmetric_kl"],
                      f"CoPD: branches' top-{c.monitor_topk} overlap and symmetric KL after each phase")
    fig.savefig(out_dir / "monitor.png", dpi=120)
    tracker.log_figure(fig, "monitor.png")
    tracker.log_artifact(out_dir / "monitor.csv")
    final = {f"copd:{d}": path / "model" for d, path in ctx.roles_of("final").items()}
    shift = weight_shift_pairs(ctx.role("student") / "model", final, eta=cfg.params.weight_shift.eta)
    shift.to_csv(out_dir / "weight_shift.csv", index=False)
    fig = weight_shift_chart(shift, f"CoPD branches after cycle {c.cycles}: changed-weight Jaccard vs random reference")
    fig.savefig(out_dir / "weight_shift.png", dpi=120)
    tracker.log_figure(fig, "weight_shift.png")
    tracker.log_artifact(out_dir / "weight_shift.csv")
    last = table[table["point"] == table["point"].max()]
    metrics = {f"{key}/{r['pair']}": float(r[key]) for _, r in last.iterrows()
               for key in ("topk_overlap", "symmetric_kl")}
    for _, r in shift[shift["group"] == "all"].iterrows():
        pair = f"{r['a'].split(':')[-1]}_{r['b'].split(':')[-1]}"
        metrics |= {f"jaccard/{pair}": float(r["jaccard"]), f"random_reference/{pair}": float(r["random_reference"])}
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("copd_monitor", run))
