"""CoPD Phase II, mutual OPD (ALGORITHMS §6; CoPD §3.2-3.3, Algorithm 1 lines 8-13).

Branch k takes `steps` optimiser steps. Each step combines
- **native** rollouts: `native_prompts` prompts of its own domain D_k, `group_size` samples each,
  scored by D_k's verifier, GRPO's group-normalised outcome advantage on every completion token
  (RLVR does not pause during mutual OPD, CoPD §3.2); and
- **cross-branch** rollouts: for every exchange partner j, `cross_prompts` prompts of D_j and
  `cross_samples` samples each *from branch k*, scored token by token by branch j's current
  weights: ``Â_t = β_k clip(log π_j(y_t) - log π_k(y_t))`` (eq. 8),

into one batch and one policy-gradient step (ratio 1, token mean as DAPO/TRL's GRPO loss).

Deliberate departure: the paper's branches update in lock-step, so the partner changes every
step. Here each branch-cycle-phase is a cached stage of the DAG, so the partner's "current"
weights are its weights at the start of the phase (the end of its Phase I of the same cycle): the
exchange is synchronous per phase, not per step. This keeps every stage resumable on its own.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from mopd import runtime
from mopd.objectives.registry import DistillBatch, get_objective
from mopd.objectives.routing import copd_advantage, group_advantages
from mopd.opd.loop import LoopPlan, Student, train_loop
from mopd.opd.sampler import rollout_and_score
from mopd.opd.scorers import as_clients
from mopd.opd.update import student_quantities
from mopd.rollout import (
    RolloutBackend,
    Sample,
    TransformersRollout,
    pack,
)
from mopd.chat import PromptFormat
from mopd.settings.copd import CoPDOPDParams
from mopd.teachers import TeacherClient, lay_out
from mopd.teachers.ledger import Ledger


@dataclass
class PhaseIIBatch:
    """One Phase II step's rollouts laid out for the update: the native rows first."""

    samples: list[Sample]
    ids_BT: torch.Tensor
    attn_BT: torch.Tensor
    mask_BT: torch.Tensor
    advantages_BT: torch.Tensor
    n_native: int
    row_partner: list[str | None]  # None for a native row, else the partner (domain) that scored it
    metrics: dict[str, float]


# why: 10 parameters: a pure function of one step's inputs (the module, the student it is with its
# tokenizer and prompt format, rollout backend, partners, scoring pool), its prompts (native,
# cross), verifier, settings and seed, tested directly.
def phase2_batch(model, student: Student, rollout: RolloutBackend, partners: dict[str, TeacherClient],
                 pool: ThreadPoolExecutor, native: list[dict], cross: dict[str, list[dict]], score_fn,
                 params: CoPDOPDParams, seed: int) -> PhaseIIBatch:
    """Sample and score one step: ``native`` records of the branch's own domain (``score_fn(texts,
    references)`` -> rewards), ``cross[j]`` records of partner j's domain scored by ``partners[j]``."""
    t0 = time.perf_counter()
    native_ids = student.render(native)
    own = rollout.sample_ids(native_ids, n=params.group_size, max_new_tokens=params.max_new_tokens,
                             temperature=params.temperature, seed=seed)
    rewards = [float(r) for r in score_fn([s.text for s in own], [native[s.prompt_index]["reference"] for s in own])]
    sample_seconds = time.perf_counter() - t0
    names = sorted(cross)
    cross_recs = [r for j in names for r in cross[j]]
    cross_domains = [j for j in names for _ in cross[j]]
    got, scores, timing, _ = rollout_and_score(
        rollout, partners, student.render(cross_recs), cross_domains, pool,
        n=params.cross_samples, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
        seed=seed + 1, chunks=1, overlap=False, topk=None)
    samples = own + got
    dev = model.lm_head.weight.device  # the batch lives where the branch does (mopd.runtime)
    ids_BT, attn_BT, mask_BT = pack(samples, student.tokenizer.pad_token_id, device=dev)
    n = len(own)
    with torch.no_grad(), runtime.current().autocast():  # the rollout policy π_k, fixed for this step
        old_s_BT = student_quantities(model, ids_BT, attn_BT, temperature=params.temperature)[0]
    adv_BT = torch.zeros_like(mask_BT, dtype=old_s_BT.dtype)
    groups_B = torch.tensor([s.prompt_index for s in own], device=dev)
    native_B = group_advantages(torch.tensor(rewards, dtype=old_s_BT.dtype, device=dev), groups_B)
    adv_BT[:n] = native_B[:, None] * mask_BT[:n]
    u_BT = lay_out(scores, [len(s.prompt_ids) for s in got], ids_BT.shape[1], None)[0].to(dev)
    adv_BT[n:] = copd_advantage(u_BT, old_s_BT[n:], beta=params.beta, clip=params.clip) * mask_BT[n:]
    row_partner: list[str | None] = [None] * n + [cross_domains[s.prompt_index] for s in got]
    metrics = {"copd/native_reward": sum(rewards) / len(rewards),
               "copd/native_zero_variance_groups": float(
                   sum(len({rewards[b] for b in range(n) if own[b].prompt_index == g}) == 1
                       for g in range(len(native))) / len(native)),
               "copd/sample_seconds": sample_seconds + timing.sample,
               "copd/teacher_seconds": timing.teacher}
    for j in names:  # K1 reverse KL of branch k to partner j along k's rollouts on D_j
        rows = [b for b in range(n, len(samples)) if row_partner[b] == j]
        m = mask_BT[rows]
        metrics[f"copd/reverse_kl_to_{j}"] = float(((old_s_BT[rows] - u_BT[[r - n for r in rows]]) * m).sum()
                                                   / m.sum().clamp(min=1))
    return PhaseIIBatch(samples, ids_BT, attn_BT, mask_BT, adv_BT, n, row_partner, metrics)


@dataclass
class CoPDStep:
    """One Phase II step of branch ``domain`` (the loop's ``step_fn``): native GRPO rollouts and
    cross-branch rollouts scored by the partners (a routed scorer over the partners' current
    weights), one policy-gradient step with token-mean averaging (as DAPO/TRL's GRPO loss)."""

    params: CoPDOPDParams
    student: Student
    optim: torch.optim.Optimizer
    rollout: RolloutBackend
    clients: dict[str, TeacherClient]
    prompts: dict[str, list[dict]]
    domain: str
    score_fn: object
    seed: int

    def __call__(self, step: int, pool: ThreadPoolExecutor) -> dict[str, float]:
        t0 = time.perf_counter()
        p, model, rng = self.params, self.student.model, self.student.rng
        native = [rng.choice(self.prompts[self.domain]) for _ in range(p.native_prompts)]
        cross = {j: [rng.choice(self.prompts[j]) for _ in range(p.cross_prompts)] for j in sorted(self.clients)}
        batch = phase2_batch(model, self.student, self.rollout, self.clients, pool, native, cross,
                             self.score_fn, p, self.seed * 100_003 + step)
        with runtime.current().autocast():
            s_BT = student_quantities(model, batch.ids_BT, batch.attn_BT, temperature=p.temperature)[0]
        loss, _ = get_objective("mopd_pg")(DistillBatch(mask_BT=batch.mask_BT, student_logprobs_BT=s_BT,
                                                        advantages_BT=batch.advantages_BT), token_mean=True)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.optim.step()
        self.rollout.update_weights(model)
        return batch.metrics | {"copd/loss": float(loss.detach()), "copd/grad_norm": float(grad_norm),
                                "copd/step_seconds": time.perf_counter() - t0,
                                "copd/trained_tokens": float(batch.mask_BT.sum())}


# why: 11 parameters: the stage's inputs (branch, partners, prompts, its domain and verifier,
# output), its settings and step count, seed and tracker, plus an optional rollout backend.
def train_copd_opd(branch_dir: Path, partners: dict[str, "TeacherClient | Path"], prompts: dict[str, list[dict]],
                   domain: str, score_fn, out_dir: Path, params: CoPDOPDParams, steps: int, seed: int, tracker, *,
                   fmt: PromptFormat, rollout: RolloutBackend | None = None) -> dict[str, list[tuple[int, float]]]:
    """Phase II of branch ``domain`` from ``branch_dir``: ``steps`` mutual-OPD steps with
    ``partners`` (partner domain -> its current checkpoint or client); ``prompts`` holds the
    records of ``domain`` and of every partner's domain; ``score_fn(texts, references)`` is
    ``domain``'s verifier. Saves to ``out_dir/model``; returns the metric history."""
    missing = [d for d in (domain, *partners) if not prompts.get(d)]
    if missing:
        raise ValueError(f"CoPD Phase II of branch {domain!r}: no prompts for domain(s) {missing}")
    if domain in partners:
        raise ValueError(f"CoPD Phase II of branch {domain!r}: a branch is not its own partner")
    student = Student.load(branch_dir, seed, fmt)
    ledger = Ledger()  # what scoring by each partner costs (mopd.teachers.ledger)
    clients = ledger.wrap(as_clients(partners))
    rollout = rollout or TransformersRollout(student.model, student.tokenizer, fmt=fmt)
    optim = torch.optim.AdamW(student.model.parameters(), lr=params.learning_rate, weight_decay=0.0)
    step = CoPDStep(params, student, optim, rollout, clients, prompts, domain, score_fn, seed)
    plan = LoopPlan(f"copd opd {domain}", steps, workers=max(2, len(clients)), thread_prefix="partner")
    return train_loop(student, optim, rollout, ledger, tracker, out_dir, plan, step)
