"""Multi-teacher weighting / routing (ALGORITHMS §3; MOPD, Uni-OPD eq. 4) and CoPD advantage (§6)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "validate_domain_weights",
    "routing_weights",
    "teacher_weights",
    "combine_teacher_logprobs",
    "copd_advantage",
    "copd_exchange_pairs",
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
                   beta: float = 1.0) -> torch.Tensor:
    """CoPD cross-branch token advantage ``β_k (log π_j(y_t) - log π_k(y_t))``, detached (B, T) (§6).

    ``partner`` = branch j's current weights acting as teacher; ``own`` = branch k (the rollout policy).
    """
    if partner_logprobs_BT.shape != own_logprobs_BT.shape:
        raise ValueError(f"partner_logprobs_BT {tuple(partner_logprobs_BT.shape)} and own_logprobs_BT "
                         f"{tuple(own_logprobs_BT.shape)} differ in shape")
    return beta * (partner_logprobs_BT - own_logprobs_BT).detach()


def copd_exchange_pairs(branches: Sequence[str], *, hub: str | None = None) -> list[tuple[str, str]]:
    """(student branch k, teacher branch j) pairs for CoPD Phase II (§6).

    K=2 (or ``hub`` None with K=2): both directions. K>2 needs a hub: hub-and-spoke, the hub learns
    from every spoke and every spoke from the hub; spokes do not exchange.
    """
    if len(set(branches)) != len(branches) or len(branches) < 2:
        raise ValueError(f"branches must be >= 2 distinct names, got {list(branches)}")
    if len(branches) == 2 and hub is None:
        a, b = branches
        return [(a, b), (b, a)]
    if hub is None or hub not in branches:
        raise ValueError(f"with {len(branches)} branches a hub from {list(branches)} is required, got hub={hub!r}")
    spokes = [b for b in branches if b != hub]
    return [(hub, s) for s in spokes] + [(s, hub) for s in spokes]
