"""Stage `offpolicy_ft`: the off-policy fine-tuning baseline (MOPD Table 2; ALGORITHMS §9):
each domain's teacher samples responses to a seeded subset of its training prompts, the
domain's verifier scores them, and the SFT student is fine-tuned (TRL SFT, completion-only
loss) on the correct ones (all of them with `correct_only: false`). The rollouts, their rewards
and what was kept are written to `rollouts.jsonl`; kept counts per domain are metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import random

from mopd.artifacts import Result
from mopd.chat import PromptFormat
from mopd.data import read_split
from mopd.models import load_tokenizer
from mopd.rollout import encode_prompts
from mopd.settings.offpolicy import OffPolicyFTParams
from mopd.stage import StageContext
from mopd.teachers.ledger import Ledger, stage_totals
from mopd.teachers.routing import open_teachers
from mopd.trainers.sft import train_sft
from tasks.plotting import log_curves

log = logging.getLogger(__name__)


def teacher_rollouts(clients: dict, tokenizer, prompts: dict[str, list[dict]], kinds: dict[str, str],
                     params: OffPolicyFTParams, seed: int, fmt: PromptFormat) -> list[dict]:
    """Every domain's teacher answers ``samples_per_prompt`` times to up to ``max_prompts`` of
    its prompts (a seeded subset); each row: domain, prompt, completion (text), reward, kept."""
    from mopd.verifiers import verify_batch

    rows: list[dict] = []
    for i, (d, recs) in enumerate(sorted(prompts.items())):
        rng = random.Random(seed * 1_000_003 + i)
        subset = rng.sample(recs, min(params.max_prompts, len(recs)))
        asked = [r for r in subset for _ in range(params.samples_per_prompt)]
        ids = encode_prompts(tokenizer, [r["prompt"] for r in asked], fmt)
        outs = clients[d].generate(ids, max_new_tokens=params.max_new_tokens,
                                   temperature=params.temperature, seed=seed * 1_000_003 + i)
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        verdicts = verify_batch([kinds[d]] * len(texts), texts, [r["reference"] for r in asked])
        for r, text, v in zip(asked, texts, verdicts):
            keep = v.reward >= params.threshold if params.correct_only else True
            rows.append({"domain": d, "prompt": r["prompt"], "completion": text,
                         "reference": r["reference"], "reward": v.reward, "kept": keep})
    return rows


def run(ctx: StageContext) -> Result:
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    params = cfg.params.offpolicy_ft
    domains = cfg.domains
    tokenizer = load_tokenizer(ctx.role("student") / "model")
    prompts = {d: read_split(ctx.role("data"), d, "train") for d in domains}
    routes = {d: cfg.domain(d).teacher for d in domains}
    local_dirs = ctx.teacher_models(domains)
    ledger = Ledger()  # what the teachers' rollouts cost (mopd.teachers.ledger)
    with contextlib.ExitStack() as stack:
        clients = ledger.wrap(open_teachers(routes, local_dirs, transport="inprocess", stack=stack,
                                            pad_id=tokenizer.pad_token_id or 0))
        rows = teacher_rollouts(clients, tokenizer, prompts, {d: cfg.domain(d).verifier for d in domains},
                                params, cfg.params.seed, ctx.prompt_format)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "rollouts.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    metrics: dict[str, float] = {}
    for d in domains:
        mine = [r for r in rows if r["domain"] == d]
        metrics[f"kept_{d}"] = float(sum(r["kept"] for r in mine))
        metrics[f"teacher_reward_{d}"] = sum(r["reward"] for r in mine) / max(1, len(mine))
    log.info("off-policy FT: kept %s of %d teacher rollouts", {d: int(metrics[f"kept_{d}"]) for d in domains},
             len(rows))
    kept = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows if r["kept"]]
    if not kept:
        raise ValueError(f"offpolicy_ft: none of the {len(rows)} teacher rollouts reached reward "
                         f"{params.threshold} (offpolicy_ft.threshold); lower it or set "
                         "offpolicy_ft.correct_only: false")
    random.Random(cfg.params.seed).shuffle(kept)
    # the student's tokens here: the completions it is fine-tuned on (one pass over them)
    student_tokens = sum(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in kept)
    metrics |= stage_totals(ledger.totals(), student_tokens)
    history = train_sft(ctx.role("student") / "model", kept, out_dir, params.sft, cfg.params.seed, tracker,
                        fmt=ctx.prompt_format, **ctx.checkpoint)
    log_curves(tracker, history, "off-policy fine-tuning", out_dir)
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("offpolicy_ft", run))
