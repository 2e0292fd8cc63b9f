"""Stage `distill` (and its variants `distill:<name>`): the student distilled on-policy from every
domain's teacher. The plain stage is MOPD (its table label is `mopd`); a variant reads
`variants.distill.<name>` on top of the `distill` section (e.g. another objective)."""

from __future__ import annotations

import contextlib

from mopd import runtime
from mopd.artifacts import Result
from mopd.data import read_balanced, read_split
from mopd.models import load_tokenizer
from mopd.opd.fidelity import fidelity_gate
from mopd.opd.settings import DistillParams
from mopd.rollout import VLLMRollout
from mopd.stage import StageContext
from mopd.teachers.ledger import history_totals
from mopd.teachers.routing import open_teachers
from mopd.trainers.distill import train_distill
from tasks.plotting import log_curves


def run(ctx: StageContext) -> Result:
    """MOPD from the SFT student with each domain routed to its own teacher (ALGORITHMS §1-§3);
    multi-round MOPD round r >= 2 (MOPD §4.4.3): from round r-1's student, over the round's
    domains, routed to the round's teachers (the stage table's `student` and `teachers` roles)."""
    cfg, round = ctx.cfg, ctx.args.get("round")
    params = cfg.params.stage_params("distill", ctx.args.get("variant"))
    from mopd.verifiers import verify_batch

    domains = cfg.round_domains if round else cfg.domains
    if round:
        params = _restrict(params, domains)
    kinds = {d: cfg.domain(d).verifier for d in domains}

    def score(d, texts, refs):
        return [v.reward for v in verify_batch([kinds[d]] * len(texts), texts, refs)]

    # Uni-OPD A.1: the difficulty stage's balanced prompt set when the pipeline runs it (and the
    # variant does not turn offline balancing off).
    if ctx.has("balanced") and params.offline_balance:
        prompts = {d: read_balanced(ctx.role("balanced"), d) for d in domains}
    else:
        prompts = {d: read_split(ctx.role("data"), d, "train") for d in domains}
    # Routing (MOPD 3.3): local domains use their teacher stage's checkpoint, in-process or started
    # as prefill servers for this stage only (`teacher_transport: http`, or `vllm`: `vllm serve` on
    # devices from the inventory); remote ones their endpoints.
    routes = {d: cfg.domain(d).teacher for d in domains}
    local_dirs = ctx.teacher_models(domains)
    student = ctx.role("student") / "model"
    # before any step: every teacher asks the prompts as the student does, and the scoring path
    # gives 0 advantage to a teacher that is the student (mopd.opd.fidelity)
    fidelity_gate(student, {d: local_dirs.get(d) for d in domains}, ctx.prompt_format,
                  [prompts[d][0]["prompt"] for d in domains], ctx.tracker, seed=cfg.params.seed)
    with contextlib.ExitStack() as stack:
        # one torch thread per local server: several full-size OpenMP teams on a small CPU host
        # oversubscribe it (benchmarks/teacher_overlap.py)
        teachers = open_teachers(routes, local_dirs, transport=params.teacher_transport,
                                 stack=stack, server_threads=1, vllm=params.teacher_vllm, topk=params.topk)
        # `runtime.rollout: vllm`: a colocated engine samples, synced to the student after each update
        rollout = (VLLMRollout(student, load_tokenizer(student), fmt=ctx.prompt_format, dtype=runtime.current().dtype)
                   if runtime.current().rollout == "vllm" else None)
        history = train_distill(student, teachers, prompts, ctx.out_dir, params, cfg.params.seed, ctx.tracker,
                                fmt=ctx.prompt_format, score_fn=score, rollout=rollout, **ctx.checkpoint)
    log_curves(ctx.tracker, history, "MOPD distillation" + (f" round {round}" if round else ""), ctx.out_dir)
    n = max(1, len(history["distill/reverse_kl"]) // 4)
    kl = [v for _, v in history["distill/reverse_kl"]]
    metrics = {"reverse_kl_first_quarter": sum(kl[:n]) / n, "reverse_kl_last_quarter": sum(kl[-n:]) / n,
               **history_totals(history, "distill/trained_tokens"),
               # the comparison's budget (ALGORITHMS §9): what the student sampled and trained on
               "budget/student_rollouts": float(len(kl) * params.prompts_per_step * params.samples_per_prompt),
               "budget/rollouts_per_step": float(params.prompts_per_step * params.samples_per_prompt),
               "budget/student_tokens": float(sum(v for _, v in history["distill/trained_tokens"]))}
    return ctx.result(metrics)


def _restrict(params: DistillParams, domains: list[str]) -> DistillParams:
    """The distill section for a round over a subset of the domains: per-batch domain shares
    renormalised over the subset; weighted-teacher rows must stay inside it."""
    shares = params.domain_weights
    if shares is not None:
        total = sum(shares[d] for d in domains)
        shares = {d: shares[d] / total for d in domains}
    rows = {d: row for d, row in (params.teacher_weights or {}).items() if d in domains}
    outside = sorted({t for row in rows.values() for t in row} - set(domains))
    if outside:
        raise ValueError(f"distill.teacher_weights names teacher(s) {outside}, which multi-round MOPD does "
                         f"not retrain (multiround.domains: {domains})")
    return params.model_copy(update={"domain_weights": shares, "teacher_weights": rows or None})

if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("distill", run))
