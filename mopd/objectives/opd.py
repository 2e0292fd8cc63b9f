"""MOPD on-policy distillation objectives (ALGORITHMS §1, §2; MOPD 3.2.1, 3.2.2; Uni-OPD eq. 5)."""

from __future__ import annotations

import torch

from mopd.objectives._common import check_mask, check_same_shape, masked_average

__all__ = [
    "opd_advantage",
    "pg_loss",
    "pg_per_token",
    "topk_distill_loss",
    "topk_distill_loss_from_logprobs",
    "topk_distill_per_token",
    "trust_probability",
    "distillation_return",
    "response_return",
]


def opd_advantage(
    teacher_logprobs_BT: torch.Tensor, student_logprobs_BT: torch.Tensor, *, clip: float | None = None
) -> torch.Tensor:
    """Per-token OPD advantage ``A_t = sg(u_t - s_t)`` (MOPD 3.2.1, the K1 reverse-KL estimator).

    Args:
        teacher_logprobs_BT: teacher log-prob of each sampled token, (B, T).
        student_logprobs_BT: student log-prob of the same tokens, (B, T).
        clip: when a number ``c``, two-sided clamp to ``[-c, c]``; None means no clip.
    Returns:
        detached advantages, (B, T).
    """
    check_same_shape(teacher_logprobs_BT=teacher_logprobs_BT, student_logprobs_BT=student_logprobs_BT)
    adv_BT = (teacher_logprobs_BT - student_logprobs_BT).detach()
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"clip must be a positive number or None, got {clip!r}")
        adv_BT = adv_BT.clamp(min=-clip, max=clip)
    return adv_BT


def pg_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    token_mean: bool = False,
) -> torch.Tensor:
    """Clipped policy-gradient loss (ALGORITHMS §1; identical to GRPO's surrogate).

    ``L_t = -min(ρ_t Â_t, clip(ρ_t, 1-ε_low, 1+ε_high) Â_t)`` with ``ρ_t = exp(s_t - sg(s_old_t))``.
    When the rollout policy is the current one, ρ=1 and ``∇L_t = -Â_t ∇s_t``.

    Args:
        logprobs_BT: current student log-probs of the sampled tokens (with grad), (B, T).
        old_logprobs_BT: rollout-time log-probs (treated as constants), (B, T).
        advantages_BT: per-token advantages (treated as constants), (B, T).
        mask_BT: response-token mask, (B, T).
        token_mean: False = mean per sequence then over sequences; True = token-mean over batch.
    Returns:
        scalar loss.
    """
    per_token_BT = pg_per_token(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT,
                                eps_low=eps_low, eps_high=eps_high)
    return masked_average(per_token_BT, mask_BT, token_mean=token_mean)


def pg_per_token(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> torch.Tensor:
    """Per-token clipped PG term ``-min(ρ Â, clip(ρ) Â)`` of ``pg_loss``, (B, T); 0 on padding."""
    check_same_shape(logprobs_BT=logprobs_BT, old_logprobs_BT=old_logprobs_BT, advantages_BT=advantages_BT)
    check_mask(mask_BT, logprobs_BT, "logprobs_BT")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    adv_BT = advantages_BT.detach()
    log_ratio_BT = logprobs_BT - old_logprobs_BT.detach()
    # Padding positions may hold garbage; zero the log-ratio there so exp() stays finite.
    valid_BT = mask_BT.bool()
    log_ratio_BT = torch.where(valid_BT, log_ratio_BT, torch.zeros_like(log_ratio_BT))
    adv_BT = torch.where(valid_BT, adv_BT, torch.zeros_like(adv_BT))
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = ratio_BT * adv_BT
    clipped_BT = ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high) * adv_BT
    return -torch.minimum(unclipped_BT, clipped_BT)


def topk_distill_loss_from_logprobs(
    student_topk_logprobs_BTK: torch.Tensor,
    teacher_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    token_mean: bool = False,
) -> torch.Tensor:
    """§2 top-k loss given the student's log-probs at the teacher's top-k ids (see ``topk_distill_loss``).

    Args:
        student_topk_logprobs_BTK: log p_v at the teacher's top-k ids (with grad), (B, T, K).
        teacher_logprobs_BTK: log q_v of the teacher's top-k tokens, (B, T, K).
        mask_BT: response-token mask, (B, T).
    """
    check_same_shape(
        student_topk_logprobs_BTK=student_topk_logprobs_BTK, teacher_logprobs_BTK=teacher_logprobs_BTK
    )
    check_mask(mask_BT, student_topk_logprobs_BTK, "student_topk_logprobs_BTK")
    per_token_BT = topk_distill_per_token(student_topk_logprobs_BTK, teacher_logprobs_BTK.detach())
    return masked_average(per_token_BT, mask_BT, token_mean=token_mean)


def topk_distill_per_token(student_topk_logprobs_BTK: torch.Tensor, teacher_logprobs_BTK: torch.Tensor) -> torch.Tensor:
    """Per-token §2 sum ``Σ_v p_v(log p_v - log q_v) - p_v + q_v`` over the K axis, shape (..., K) -> (...)."""
    # MOPD 3.2.2: the -p+q term corrects for truncation to K_t; each summand is >= 0, zero iff p_v == q_v.
    p_BTK = student_topk_logprobs_BTK.exp()
    q_BTK = teacher_logprobs_BTK.exp()
    return (p_BTK * (student_topk_logprobs_BTK - teacher_logprobs_BTK) - p_BTK + q_BTK).sum(dim=-1)


def topk_distill_loss(
    student_logits_BTV: torch.Tensor,
    teacher_ids_BTK: torch.Tensor,
    teacher_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    token_mean: bool = False,
) -> torch.Tensor:
    """Top-k distillation loss with truncation correction (ALGORITHMS §2, MOPD 3.2.2).

    ``L_t = Σ_{v∈K_t} [p_v (log p_v - log q_v) - p_v + q_v]`` with p the student, q the teacher and
    K_t the teacher's top-k ids. Zero and stationary exactly when p_v = q_v on K_t.
    This materialises log-softmax over V; use ``mopd.logits.chunked_topk_distill_loss`` for large V.

    Args:
        student_logits_BTV: student logits (with grad), (B, T, V).
        teacher_ids_BTK: teacher top-k token ids, int64 (B, T, K).
        teacher_logprobs_BTK: teacher log-probs of those ids, (B, T, K).
        mask_BT: response-token mask, (B, T).
    Returns:
        scalar loss (same averaging as ``pg_loss``).
    """
    if student_logits_BTV.dim() != 3:
        raise ValueError(f"student_logits_BTV must be 3-D (B, T, V), got shape {tuple(student_logits_BTV.shape)}")
    check_same_shape(teacher_ids_BTK=teacher_ids_BTK, teacher_logprobs_BTK=teacher_logprobs_BTK)
    if teacher_ids_BTK.shape[:2] != student_logits_BTV.shape[:2]:
        raise ValueError(
            f"teacher_ids_BTK leading dims {tuple(teacher_ids_BTK.shape[:2])} do not match "
            f"student_logits_BTV {tuple(student_logits_BTV.shape[:2])}"
        )
    V = student_logits_BTV.shape[-1]
    if teacher_ids_BTK.numel() and (int(teacher_ids_BTK.min()) < 0 or int(teacher_ids_BTK.max()) >= V):
        raise ValueError(f"teacher_ids_BTK must lie in [0, {V}), got range "
                         f"[{int(teacher_ids_BTK.min())}, {int(teacher_ids_BTK.max())}]")
    logp_BTV = torch.log_softmax(student_logits_BTV, dim=-1)
    student_topk_BTK = logp_BTV.gather(-1, teacher_ids_BTK.long())
    return topk_distill_loss_from_logprobs(student_topk_BTK, teacher_logprobs_BTK, mask_BT, token_mean=token_mean)


def trust_probability(teacher_logprobs_BT: torch.Tensor, student_logprobs_BT: torch.Tensor) -> torch.Tensor:
    """TrOPD acceptance probability ``min(exp(u_t - s_t), 1)`` (speculative-decoding rule), (B, T), detached."""
    check_same_shape(teacher_logprobs_BT=teacher_logprobs_BT, student_logprobs_BT=student_logprobs_BT)
    # clamp the log first: exp of a large positive gap would overflow before the min.
    return torch.exp((teacher_logprobs_BT - student_logprobs_BT).detach().clamp(max=0.0))


def distillation_return(
    teacher_logprobs_BT: torch.Tensor, student_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Uni-OPD eq. 5 distillation return ``R(y) = 1/|y| Σ_t (u_t - s_t)`` per response, (B,), detached.

    A response with no masked token gets return 0.
    """
    check_same_shape(teacher_logprobs_BT=teacher_logprobs_BT, student_logprobs_BT=student_logprobs_BT)
    return response_return(teacher_logprobs_BT - student_logprobs_BT, mask_BT)


def response_return(rewards_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """The eq. 5 average ``1/|y| Σ_t r_t`` of any token rewards per response, (B,), detached
    (0 for a response with no masked token). The trainer's Uni-OPD calibration passes the clipped
    K1 rewards (:func:`mopd.opd.shapers.uniopd_advantages` says why)."""
    check_mask(mask_BT, rewards_BT, "rewards_BT")
    r_BT = rewards_BT.detach()
    r_BT = torch.where(mask_BT.bool(), r_BT, torch.zeros_like(r_BT))
    return r_BT.sum(dim=-1) / mask_BT.to(r_BT.dtype).sum(dim=-1).clamp(min=1.0)
