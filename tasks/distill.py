"""Stage `distill` (and its variants `distill:<name>`): the student distilled on-policy from every
domain's teacher. The plain stage is MOPD (its table label is `mopd`); a variant reads
`variants.distill.<name>` on top of the `distill` section (e.g. another objective)."""

from __future__ import annotations

from typing import TYPE_CHECKING
import contextlib
import os
from pathlib import Path

from mopd import runtime
from mopd.artifacts import Result, finalize
from mopd.checkpoint import KEY_ENV, checkpoint_dir
from mopd.opd.settings import DistillParams
from mopd.settings.multiround import MultiRoundParams
from mopd.data import read_balanced, read_split
from mopd.models import load_tokenizer
from mopd.rollout import VLLMRollout
from mopd.teachers.ledger import history_totals
from mopd.teachers.routing import open_teachers
from mopd.trainers.distill import train_mopd
from tasks.plotting import log_curves

if TYPE_CHECKING:  # the root configuration belongs to the runner (tasks.cli)
    from mopd.config import Config


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker, *,
        variant: str | None = None, round: str | None = None) -> Result:
    """MOPD from the SFT student with each domain routed to its own teacher (ALGORITHMS §1-§3);
    multi-round MOPD round r >= 2 (MOPD §4.4.3): from round r-1's student, over the round's
    domains, routed to the round's teachers."""
    params = cfg.params.stage_params("distill", variant)
    from mopd.verifiers import verify_batch

    domains = cfg.round_domains if round else cfg.domains
    if round:
        params = _restrict(params, domains)
    kinds = {d: cfg.domain(d).verifier for d in domains}

    def score(d, texts, refs):
        return [v.reward for v in verify_batch([kinds[d]] * len(texts), texts, refs)]

    # Uni-OPD A.1: the difficulty stage's balanced prompt set when the pipeline runs it (and the
    # variant does not turn offline balancing off).
    if "difficulty" in inputs and params.offline_balance:
        prompts = {d: read_balanced(inputs["difficulty"], d) for d in domains}
    else:
        prompts = {d: read_split(inputs["data"], d, "train") for d in domains}
    # Routing (MOPD 3.3): local domains use the `teacher:<d>` checkpoint (round r: the
    # `round_teacher:<r>:<d>` one), in-process or started as prefill servers for this stage only
    # (`teacher_transport: http`); remote ones their endpoints.
    routes = {d: cfg.domain(d).teacher for d in domains}
    local_dirs = {d: inputs[f"round_teacher:{round}:{d}" if round else f"teacher:{d}"] / "model"
                  for d in cfg.local_teacher_domains if d in domains}
    student = inputs[MultiRoundParams.student_stage(int(round) - 1) if round else "sft"] / "model"
    name = f"multiround:{round}" if round else (f"distill:{variant}" if variant else "distill")
    with contextlib.ExitStack() as stack:
        # one torch thread per local server: several full-size OpenMP teams on a small CPU host
        # oversubscribe it (benchmarks/teacher_overlap.py)
        teachers = open_teachers(routes, local_dirs, transport=params.teacher_transport,
                                 stack=stack, server_threads=1)
        # `runtime.rollout: vllm`: a colocated engine samples, synced to the student after each update
        rollout = (VLLMRollout(student, load_tokenizer(student), dtype=runtime.current().dtype)
                   if runtime.current().rollout == "vllm" else None)
        history = train_mopd(student, teachers, prompts, out_dir, params, cfg.params.seed, tracker, score_fn=score,
                             rollout=rollout, checkpoint=checkpoint_dir(cfg.project_dir, name),
                             key=os.environ.get(KEY_ENV, ""))
    log_curves(tracker, history, "MOPD distillation" + (f" round {round}" if round else ""))
    n = max(1, len(history["distill/reverse_kl"]) // 4)
    kl = [v for _, v in history["distill/reverse_kl"]]
    metrics = {"reverse_kl_first_quarter": sum(kl[:n]) / n, "reverse_kl_last_quarter": sum(kl[-n:]) / n,
               **history_totals(history, "distill/trained_tokens")}
    return finalize(name, cfg.project_dir, out_dir, metrics)


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
    from tasks.cli import main

    raise SystemExit(main("distill", run))
