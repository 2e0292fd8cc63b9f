"""Multi-teacher weighting / routing (ALGORITHMS §3; MOPD, Uni-OPD eq. 4) and CoPD advantage (§6)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from mopd.copd import copd_exchange_pairs  # torch-free: the DAG and config use it too

__all__ = [
    "validate_domain_weights",
    "routing_weights",
    "teacher_weights",
    "combine_teacher_logprobs",
    "copd_advantage",
    "copd_exchange_pairs",
    "group_advantages",
]


def validate_domain_weights(weights: Mapping[str, Mapping[str, float]], teachers: Sequence[str]) -> None:
    """Check per-domain teacher weights: known teachers, non-negative, summing to 1 (tolerance 1e-6)."""
    known = set(teachers)
    for domain, row in weights.items():
        unknown = sorted(set(row) - known)
        if unknown:
            raise ValueError(f"domain {domain!r}: unknown teacher(s) {unknown}; known teachers: {sorted(known)}")
        neg = {t: w for t, w in row.items() if w < 0}
        if neg:
            raise ValueError(f"domain {domain!r}: negative weight(s) {neg}")
        total = math.fsum(row.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"domain {domain!r}: teacher weights must sum to 1, got {total} ({dict(row)})")


def routing_weights(routing: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """One-hot weights from a routing table domain -> teacher (MOPD routing = one-hot Uni-OPD eq. 4)."""
    return {domain: {teacher: 1.0} for domain, teacher in routing.items()}


def teacher_weights(
    domains_B: Sequence[str], weights: Mapping[str, Mapping[str, float]], teachers: Sequence[str]
) -> torch.Tensor:
    """Per-sample teacher weights ``w_BM`` (B prompts × M teachers, float64, rows sum to 1).

    Args:
        domains_B: domain of each prompt.
        weights: domain -> {teacher: weight}; teachers not listed get weight 0.
        teachers: the M teacher names, in the column order of the result.
    """
    validate_domain_weights(weights, teachers)
    col = {t: j for j, t in enumerate(teachers)}
    w_BM = torch.zeros(len(domains_B), len(teachers), dtype=torch.float64)
    for b, domain in enumerate(domains_B):
        if domain not in weights:
            raise ValueError(f"prompt {b}: domain {domain!r} has no teacher weights; known domains: {sorted(weights)}")
        for teacher, w in weights[domain].items():
            w_BM[b, col[teacher]] = w
    return w_BM


def combine_teacher_logprobs(teacher_logprobs_MBT: torch.Tensor, weights_BM: torch.Tensor) -> torch.Tensor:
    """Weighted teacher log-prob ``Σ_i w_i u_i`` per token, (B, T).

    With the K1 estimator, ``Σ_i w_i KL(πS ‖ πTi)`` has per-token reward ``Σ_i w_i (u_i - s) =
    (Σ_i w_i u_i) - s``, so this value replaces the single teacher's ``u_t`` in §1. Entries of a
    teacher with weight 0 for a prompt are ignored (they may hold NaN: that teacher was not queried).
    """
    if teacher_logprobs_MBT.dim() != 3:
        raise ValueError(f"teacher_logprobs_MBT must be (M, B, T), got {tuple(teacher_logprobs_MBT.shape)}")
    M, B, _ = teacher_logprobs_MBT.shape
    if tuple(weights_BM.shape) != (B, M):
        raise ValueError(f"weights_BM must have shape (B, M) = {(B, M)}, got {tuple(weights_BM.shape)}")
    w_MB1 = weights_BM.T.to(teacher_logprobs_MBT.dtype)[:, :, None]
    used_MBT = (w_MB1 != 0).expand_as(teacher_logprobs_MBT)
    vals_MBT = torch.where(used_MBT, teacher_logprobs_MBT * w_MB1, torch.zeros_like(teacher_logprobs_MBT))
    return vals_MBT.sum(dim=0)


def copd_advantage(partner_logprobs_BT: torch.Tensor, own_logprobs_BT: torch.Tensor, *,
                   beta: float = 1.0, clip: float | None = None) -> torch.Tensor:
    """CoPD cross-branch token advantage ``β_k (log π_j(y_t) - log π_k(y_t))``, detached (B, T)
    (§6, CoPD eq. 8). ``clip``: the log-ratio clamped to [-clip, clip] first (as MOPD's §1 clip).

    ``partner`` = branch j's current weights acting as teacher; ``own`` = branch k (the rollout policy).
    """
    if partner_logprobs_BT.shape != own_logprobs_BT.shape:
        raise ValueError(f"partner_logprobs_BT {tuple(partner_logprobs_BT.shape)} and own_logprobs_BT "
                         f"{tuple(own_logprobs_BT.shape)} differ in shape")
    delta_BT = (partner_logprobs_BT - own_logprobs_BT).detach()
    if clip is not None:
        delta_BT = delta_BT.clamp(min=-clip, max=clip)
    return beta * delta_BT


def group_advantages(rewards_B: torch.Tensor, groups_B: torch.Tensor, *, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage of each rollout, ``(r - mean_g) / (std_g + eps)`` inside its prompt
    group g (unbiased std, as TRL's default ``scale_rewards="group"``): CoPD Phase II's native
    rollouts (Alg. 1 line 10). A group with one rollout or equal rewards gets 0."""
    if rewards_B.shape != groups_B.shape or rewards_B.dim() != 1:
        raise ValueError(f"rewards_B {tuple(rewards_B.shape)} and groups_B {tuple(groups_B.shape)} must be "
                         "equal 1-D shapes")
    r = rewards_B.double()
    out = torch.zeros_like(r)
    for g in groups_B.unique():
        idx = groups_B == g
        if idx.sum() > 1:
            out[idx] = (r[idx] - r[idx].mean()) / (r[idx].std() + eps)
    return out.to(rewards_B.dtype) if rewards_B.is_floating_point() else out
