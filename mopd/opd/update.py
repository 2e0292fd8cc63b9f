"""The update: one rollout batch → the student's optimiser step(s) (ALGORITHMS §1).

`epochs` passes over the batch, each in `minibatches` shuffled minibatches; for each, the
student's log-probs (top-k gathers, entropies when the loss needs them) come from the chunked
LM-head path (:mod:`mopd.logits`: the B×T×V logits are never materialised), the method's loss
is taken on a :class:`~mopd.objectives.registry.DistillBatch`, and one optimiser step follows.
Under data parallelism the student's forward runs through accelerate's DDP wrapper
(:class:`StudentForward`, :func:`mopd.runtime.prepare_data_parallel`): each process's loss is
weighted by its share of the batch's averaging units and the gradients are reduced in buckets
during ``backward``, which equals the one-process update for per-token averages. A method that
selects tokens over the whole batch (``row_local=False``) runs its loss on every process over the
whole (gathered) batch instead: identical gradients, so the average is the one-process gradient.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

from mopd import runtime
from mopd.logits import chunked_gather_logprobs, chunked_token_logprobs
from mopd.objectives.opd import opd_advantage
from mopd.objectives.registry import DistillBatch
from mopd.opd.batch import PackedBatch

# step metrics that are means over the batch's response tokens (data parallelism weights them so)
TOKEN_MEAN_METRICS = {"distill/reverse_kl", "distill/clipped_fraction"}
TOPK_FIELDS = {"teacher_topk_logprobs_BTK", "student_topk_logprobs_BTK", "teacher_topk_ids_BTK"}


def student_quantities(model, ids_BT, attn_BT, *, topk_ids_BTK=None, entropy: bool = False,
                       chunk: int = 1024, temperature: float = 1.0):
    """Student ``s_BT`` (log-prob of each token), optionally ``topk_BTK`` (log-probs at the given
    ids) and ``entropy_BT``, from hidden states and the LM-head weight in token chunks. Position t
    holds the distribution that predicts token t (position 0: zeros). All differentiable.

    ``temperature``: the distribution the rollouts were sampled from, softmax(logits / T): the
    policy whose log-probs enter the ratio and the advantage is the one that sampled (logits =
    h·Wᵀ, so h / T gives logits / T exactly)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hidden_BTH = model.model(input_ids=ids_BT, attention_mask=attn_BT).last_hidden_state
    B, T, H = hidden_BTH.shape
    h_NH = hidden_BTH[:, :-1].reshape(-1, H)
    if temperature != 1.0:
        h_NH = h_NH / temperature
    weight_VH = model.lm_head.weight
    target_N = ids_BT[:, 1:].reshape(-1)

    def pad(x_N, *rest):  # (N, *rest) -> (B, T, *rest) with zeros at position 0
        return torch.nn.functional.pad(x_N.view(B, T - 1, *rest), (0, 0) * len(rest) + (1, 0))

    ent_BT = None
    if entropy:
        s_N, ent_N = chunked_token_logprobs(h_NH, weight_VH, target_N, chunk=chunk)
        ent_BT = pad(ent_N)
    if topk_ids_BTK is not None:
        K = topk_ids_BTK.shape[-1]
        ids_NK = torch.cat([target_N[:, None], topk_ids_BTK[:, 1:].reshape(-1, K)], dim=1)
        lp_NK = chunked_gather_logprobs(h_NH, weight_VH, ids_NK, chunk=chunk)
        return pad(lp_NK[:, 0]), pad(lp_NK[:, 1:], K), ent_BT
    if not entropy:
        s_N = chunked_gather_logprobs(h_NH, weight_VH, target_N[:, None], chunk=chunk)[:, 0]
    return pad(s_N), None, ent_BT


class StudentForward(torch.nn.Module):
    """:func:`student_quantities` as one module call: what a data-parallel wrapper (DDP) must see
    run for its gradient hooks to reduce during ``backward``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids_BT, attn_BT, topk_ids_BTK=None, entropy: bool = False, temperature: float = 1.0):
        return student_quantities(self.model, ids_BT, attn_BT, topk_ids_BTK=topk_ids_BTK, entropy=entropy,
                                  temperature=temperature)


def update_passes(params, n_rows: int, rng: random.Random) -> list[list[int]]:
    """The optimiser steps of one rollout batch (§1): ``params.epochs`` passes over the rows, each
    split into ``params.minibatches`` shuffled minibatches (the first pass keeps row order when
    there is only one minibatch, so the default — one step — is exactly the plain update)."""
    rows = list(range(n_rows))
    if params.epochs == 1 and params.minibatches == 1:
        return [rows]
    k = min(params.minibatches, n_rows)
    out = []
    for _ in range(params.epochs):
        order = rows[:]
        rng.shuffle(order)
        out += [sorted(order[i::k]) for i in range(k)]
    return out


def _rows(x, rows: list[int]):
    return None if x is None else x[rows]


@dataclass(frozen=True)
class Update:
    """The student's update for one method: ``loss_fn(batch, **kwargs) -> (loss, metrics)`` over
    the DistillBatch fields in ``needs``; sequences sampled at ``temperature``; ``token_mean``
    averaging (what data parallelism weights by); ``eps`` = the PPO clip (for the
    clipped-fraction diagnostic); ``part = (rank, world)`` data-parallel processes; ``row_local``:
    the loss is a sum of per-row terms over the batch's averaging units (False: it selects over
    the whole batch, e.g. the top-entropy tokens)."""

    loss_fn: Callable
    needs: frozenset[str]
    temperature: float
    token_mean: bool
    eps: tuple[float, float] = (0.2, 0.2)
    part: tuple[int, int] = (0, 1)
    metric_prefix: str = "distill/"
    clip: float | None = None  # the K1 advantage's two-sided clip, when a shaper weights it
    row_local: bool = True

    @property
    def world(self) -> int:
        return self.part[1]

    def __call__(self, student, optim, packed: PackedBatch, passes: list[list[int]], kwargs: dict,
                 gathered: bool = False) -> dict[str, float]:
        """Every pass's optimiser step; returns the metrics averaged over the passes. ``student``:
        the module whose call gives the student's quantities (:class:`StudentForward`, wrapped for
        data parallelism). ``gathered``: every process holds the whole
        batch (else only the rows it sampled); each then trains on its share of each pass's rows,
        or on all of them when the loss is not row-local or a pass has fewer rows than processes."""
        sums: dict[str, float] = {}
        rank, world = self.part
        for rows in passes:
            replicated = gathered and (not self.row_local or len(rows) < world)
            mine = rows[rank::world] if gathered and not replicated else rows
            part = self._step(student, optim, packed, mine, kwargs, several=len(passes) > 1, replicated=replicated)
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v / len(passes)
        return sums

    def _advantages(self, p: PackedBatch, rows: list[int], s_BT: torch.Tensor, u_BT: torch.Tensor):
        """The advantages a shaper set, or — when shapers weight it or ask for a refresh — the K1
        advantage ``w · clip(u - s_ref)`` with ``s_ref`` the rollout policy's log-probs, or with
        ``refresh`` the student's at this pass (detached; Open-MOPD M4)."""
        adv = _rows(p.advantages_BT, rows)
        if not p.refresh and p.weight_BT is None:
            return adv
        if p.refresh or adv is None:
            ref = s_BT if p.refresh or p.old_logprobs_BT is None else p.old_logprobs_BT[rows]
            adv = opd_advantage(u_BT, ref.detach(), clip=self.clip)
        return adv if p.weight_BT is None else adv * p.weight_BT[rows]

    def _step(self, student, optim, p: PackedBatch, rows: list[int], kwargs: dict, several: bool,
              replicated: bool = False) -> dict[str, float]:
        with runtime.current().autocast():
            s_BT, s_topk_BTK, ent_BT = student(
                p.ids_BT[rows], p.attn_BT[rows], topk_ids_BTK=_rows(p.teacher_topk_ids_BTK, rows),
                entropy="student_entropy_BT" in self.needs, temperature=self.temperature)
        m_BT, u_BT = p.mask_BT[rows], p.teacher_logprobs_BT[rows]
        batch = DistillBatch(mask_BT=m_BT, student_logprobs_BT=s_BT, teacher_logprobs_BT=u_BT,
                             old_student_logprobs_BT=_rows(p.old_logprobs_BT, rows),
                             advantages_BT=self._advantages(p, rows, s_BT, u_BT),
                             teacher_topk_ids_BTK=_rows(p.teacher_topk_ids_BTK, rows),
                             teacher_topk_logprobs_BTK=_rows(p.teacher_topk_logprobs_BTK, rows),
                             student_topk_logprobs_BTK=s_topk_BTK, student_entropy_BT=ent_BT,
                             prefix_student_logprobs_BT=None if p.prefix_BT is None else s_BT,
                             prefix_mask_BT=_rows(p.prefix_BT, rows))
        loss, obj_metrics = self.loss_fn(batch, **kwargs)
        # data parallelism: this process's share of the batch's averaging units (tokens with
        # token_mean, else sequences with a response token); 1 in one process and when every
        # process computes the whole batch's loss (replicated)
        tok_mine = float(m_BT.sum())
        n_mine = tok_mine if self.token_mean else float((m_BT.sum(-1) > 0).sum())
        n_all, tok_all = (n_mine, tok_mine) if replicated else runtime.all_reduce_sum(n_mine, tok_mine)
        share = n_mine / n_all if n_all else 0.0
        optim.zero_grad(set_to_none=True)
        # DDP averages the processes' gradients: scaled by the world size, the average is the
        # share-weighted sum, the whole batch's gradient (replicated: the same gradient everywhere)
        (loss * (1.0 if replicated else share * self.world)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optim.step()
        pre, n_mb = self.metric_prefix, m_BT.sum().clamp(min=1)
        part = {f"{pre}{k}": v for k, v in obj_metrics.items()} | {
            f"{pre}loss": loss.item(), f"{pre}grad_norm": float(grad_norm),
            # K1 estimate of the per-token reverse KL to the routed teachers (§8 diagnostic)
            f"{pre}reverse_kl": float(((s_BT.detach() - u_BT) * m_BT).sum() / n_mb)}
        if several:  # share of tokens whose PPO ratio left [1 - eps_low, 1 + eps_high]
            ratio = torch.exp(s_BT.detach() - p.old_logprobs_BT[rows])
            out = (ratio < 1 - self.eps[0]) | (ratio > 1 + self.eps[1])
            part[f"{pre}clipped_fraction"] = float((out & m_BT.bool()).sum() / n_mb)
        if self.world > 1 and not replicated:  # the batch's values: share-weighted sums (token means by tokens)
            w = {k: tok_mine / tok_all if k in TOKEN_MEAN_METRICS and tok_all else share for k in part}
            part = dict(zip(part, runtime.all_reduce_sum(*(v * w[k] for k, v in part.items()))))
        return part
