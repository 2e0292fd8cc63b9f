"""TrOPD and the OPD baselines it compares against (ALGORITHMS §5; TrOPD §3–§4, Table 1/2).

All per-token terms here are (B, T) tensors; callers average them with ``masked_average``.
Top-k terms take the student's log-probs at the teacher's top-k ids (``student_topk_logprobs_BTK``),
so they never need the full vocabulary (see ``mopd.logits`` for computing them chunked).
"""

from __future__ import annotations

import math

import torch

from mopd.objectives._common import check_mask, check_same_shape, masked_average
from mopd.objectives.opd import trust_probability

__all__ = [
    "trust_mask",
    "topk_fkl_per_token",
    "prefix_guidance_loss",
    "cosine_prefix_length",
    "tropd_loss",
    "reopold_clip_advantage",
    "mask_outlier_advantage",
    "entropy_top_mask",
    "jsd_topk_per_token",
    "jsd_k1_advantage",
    "generalized_jsd_full",
]


def trust_mask(
    teacher_logprobs_BT: torch.Tensor,
    student_logprobs_BT: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TrOPD trust region ``M_t ~ Bernoulli(min(exp(u_t - s_t), 1))`` (speculative-decoding acceptance).

    Returns a bool (B, T) tensor; pass a seeded ``torch.Generator`` for reproducibility (it must live
    on the tensors' device).
    """
    prob_BT = trust_probability(teacher_logprobs_BT, student_logprobs_BT)
    return torch.bernoulli(prob_BT, generator=generator).bool()


def topk_fkl_per_token(student_topk_logprobs_BTK: torch.Tensor, teacher_topk_logprobs_BTK: torch.Tensor) -> torch.Tensor:
    """Top-k forward KL ``F_t = Σ_{v∈K_t} q_v (log q_v - log p_v)`` (TrOPD eq. for outliers), (B, T).

    Gradient flows into the student log-probs only.
    """
    check_same_shape(student_topk_logprobs_BTK=student_topk_logprobs_BTK,
                     teacher_topk_logprobs_BTK=teacher_topk_logprobs_BTK)
    lq_BTK = teacher_topk_logprobs_BTK.detach()
    return (lq_BTK.exp() * (lq_BTK - student_topk_logprobs_BTK)).sum(dim=-1)


def prefix_guidance_loss(
    prefix_logprobs_BT: torch.Tensor, prefix_mask_BT: torch.Tensor, *, beta: float = 0.001, token_mean: bool = False
) -> torch.Tensor:
    """Off-policy guidance ``β · mean(-log p(y_t))`` over teacher-generated prefix tokens (TrOPD §4.3).

    Args:
        prefix_logprobs_BT: student log-probs of the teacher's prefix tokens (with grad), (B, T).
        prefix_mask_BT: 1 on prefix tokens, (B, T). A batch without prefix tokens gives 0.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return beta * masked_average(-prefix_logprobs_BT, prefix_mask_BT, token_mean=token_mean)


def cosine_prefix_length(step: int, total_steps: int, max_length: int) -> int:
    """Prefix-length cap ``l_max(step)``: cosine from ``max_length`` at step 0 to 0 at ``total_steps``.

    ``l_max = floor(max_length · (1 + cos(π · step / total_steps)) / 2)``; steps past the end give 0.
    """
    if total_steps < 1 or max_length < 0 or step < 0:
        raise ValueError(f"need total_steps >= 1, max_length >= 0, step >= 0; got "
                         f"step={step}, total_steps={total_steps}, max_length={max_length}")
    frac = min(step, total_steps) / total_steps
    return int(math.floor(max_length * 0.5 * (1.0 + math.cos(math.pi * frac)) + 1e-9))


def tropd_loss(
    pg_per_token_BT: torch.Tensor,
    fkl_per_token_BT: torch.Tensor,
    trust_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    token_mean: bool = False,
) -> torch.Tensor:
    """TrOPD on-policy part: average of ``M_t·PG_t + (1-M_t)·F_t`` over student response tokens (§5).

    The prefix-guidance term is added separately (``prefix_guidance_loss``).
    """
    check_same_shape(pg_per_token_BT=pg_per_token_BT, fkl_per_token_BT=fkl_per_token_BT, trust_BT=trust_BT)
    check_mask(mask_BT, pg_per_token_BT, "pg_per_token_BT")
    per_token_BT = torch.where(trust_BT.bool(), pg_per_token_BT, fkl_per_token_BT)
    return masked_average(per_token_BT, mask_BT, token_mean=token_mean)


def reopold_clip_advantage(teacher_logprobs_BT: torch.Tensor, student_logprobs_BT: torch.Tensor, *,
                           tau: float = -5.0) -> torch.Tensor:
    """Clip Outlier (REOPOLD): ``r_t = max(u_t - s_t, τ)``, detached (B, T). τ default is our choice."""
    check_same_shape(teacher_logprobs_BT=teacher_logprobs_BT, student_logprobs_BT=student_logprobs_BT)
    return (teacher_logprobs_BT - student_logprobs_BT).detach().clamp(min=tau)


def mask_outlier_advantage(teacher_logprobs_BT: torch.Tensor, student_logprobs_BT: torch.Tensor, *,
                           tau: float = -5.0) -> torch.Tensor:
    """Mask Outlier: ``r_t = 1[u_t - s_t > τ] · (u_t - s_t)``, detached (B, T)."""
    check_same_shape(teacher_logprobs_BT=teacher_logprobs_BT, student_logprobs_BT=student_logprobs_BT)
    r_BT = (teacher_logprobs_BT - student_logprobs_BT).detach()
    return torch.where(r_BT > tau, r_BT, torch.zeros_like(r_BT))


def entropy_top_mask(entropy_BT: torch.Tensor, mask_BT: torch.Tensor, *, frac: float = 0.2) -> torch.Tensor:
    """Entropy-OPD token selection: the ``ceil(frac · n)`` highest-entropy response tokens of the batch.

    Returns a bool (B, T) mask (ties broken by ``torch.topk``); n = number of response tokens.
    """
    check_mask(mask_BT, entropy_BT, "entropy_BT")
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must lie in (0, 1], got {frac}")
    valid_BT = mask_BT.bool()
    n = int(valid_BT.sum())
    out_BT = torch.zeros_like(valid_BT)
    if n == 0:
        return out_BT
    n_keep = math.ceil(frac * n)
    scores_N = torch.where(valid_BT, entropy_BT.detach(), torch.full_like(entropy_BT, -math.inf)).flatten()
    top_idx = torch.topk(scores_N, n_keep).indices
    out_BT.view(-1)[top_idx] = True
    return out_BT


def _log_mixture(lq: torch.Tensor, lp: torch.Tensor, beta: float) -> torch.Tensor:
    """log(β q + (1-β) p) computed stably from log q and log p, for 0 < β < 1."""
    return torch.logaddexp(lq + math.log(beta), lp + math.log1p(-beta))


def jsd_topk_per_token(student_topk_logprobs_BTK: torch.Tensor, teacher_topk_logprobs_BTK: torch.Tensor, *,
                       beta: float = 0.5) -> torch.Tensor:
    """First JSD(β) term of TrOPD eq. 4: ``β Σ_{v∈K_t} q_v log(q_v / m_v)``, m = βq + (1-β)p, (B, T)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1) for the top-k JSD, got {beta}")
    check_same_shape(student_topk_logprobs_BTK=student_topk_logprobs_BTK,
                     teacher_topk_logprobs_BTK=teacher_topk_logprobs_BTK)
    lq = teacher_topk_logprobs_BTK.detach()
    lm = _log_mixture(lq, student_topk_logprobs_BTK, beta)
    return beta * (lq.exp() * (lq - lm)).sum(dim=-1)


def jsd_k1_advantage(teacher_logprobs_BT: torch.Tensor, student_logprobs_BT: torch.Tensor, *,
                     beta: float = 0.5) -> torch.Tensor:
    """Second JSD(β) term as a K1 policy-gradient reward: ``A_t = -(1-β) sg(s_t - log m_{y_t})`` (B, T).

    With ``pg_loss`` this gives the gradient of ``(1-β) E_{y~p}[s_t - log m_{y_t}]`` in the same
    score-function form as §1 (the K1 estimator of KL(p ‖ m) on the sampled token).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1), got {beta}")
    check_same_shape(teacher_logprobs_BT=teacher_logprobs_BT, student_logprobs_BT=student_logprobs_BT)
    s = student_logprobs_BT.detach()
    return -(1.0 - beta) * (s - _log_mixture(teacher_logprobs_BT.detach(), s, beta))


def generalized_jsd_full(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Full-vocabulary generalised JSD, the GKD loss, token-mean over masked tokens.

    ``β KL(q ‖ m) + (1-β) KL(p ‖ m)``, m = βq + (1-β)p. Same convention as TRL's
    ``GKDTrainer.generalized_jsd_loss`` (reduction="batchmean" with labels), including its endpoints:
    β=0 gives KL(q ‖ p) and β=1 gives KL(p ‖ q). Materialises B×T×V; a reference/baseline, not the
    memory-lean path.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError(f"student_logits_BTV {tuple(student_logits_BTV.shape)} and teacher_logits_BTV "
                         f"{tuple(teacher_logits_BTV.shape)} differ in shape")
    lp = torch.log_softmax(student_logits_BTV / temperature, dim=-1)
    lq = torch.log_softmax(teacher_logits_BTV / temperature, dim=-1)
    if beta == 0.0:
        per_BT = (lq.exp() * (lq - lp)).sum(-1)
    elif beta == 1.0:
        per_BT = (lp.exp() * (lp - lq)).sum(-1)
    else:
        lm = _log_mixture(lq, lp, beta)
        per_BT = beta * (lq.exp() * (lq - lm)).sum(-1) + (1 - beta) * (lp.exp() * (lp - lm)).sum(-1)
    if mask_BT is None:
        mask_BT = torch.ones(per_BT.shape, device=per_BT.device)
    return masked_average(per_BT, mask_BT, token_mean=True)
