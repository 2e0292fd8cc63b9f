"""Uni-OPD outcome-guided margin calibration (ALGORITHMS §4; Uni-OPD eq. 9, 11, Alg. 1/2, A.4).

Operates on one rollout group (G responses of one prompt): trajectory-level distillation returns
``R(y)`` (eq. 5, see ``distillation_return``) and the outcome correctness of each response.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["margin", "margin_calibrate", "margin_calibrate_groups", "calibrated_token_advantages"]

_MODES = ("mean", "minmax")
_STRATEGIES = ("lift", "suppress", "spread", "mask")


def _margin_from_lists(pos: list[float], neg: list[float], mode: str) -> float:
    # Uni-OPD eq. 9: MinMax m = min_P R - max_N R ; Mean m = mean_P R - mean_N R.
    if mode == "minmax":
        return min(pos) - max(neg)
    return sum(pos) / len(pos) - sum(neg) / len(neg)


def margin(returns_G: torch.Tensor, positive_G: torch.Tensor, *, mode: str = "mean") -> float | None:
    """Prompt-level margin between positives and negatives (Uni-OPD eq. 9); None when P or N is empty."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    pos = returns_G[positive_G].tolist()
    neg = returns_G[~positive_G].tolist()
    if not pos or not neg:
        return None
    return _margin_from_lists(pos, neg, mode)


def _greedy_mask(returns: list[float], positive: list[bool], gamma: float, mode: str, min_keep: float) -> list[bool]:
    """Uni-OPD Alg. 1 (Greedy Margin Mask): drop the most adversarial response one at a time."""
    G = len(returns)
    keep = [True] * G
    # positives ascending (worst correct first), negatives descending (best incorrect first)
    pos_order = sorted((i for i in range(G) if positive[i]), key=lambda i: returns[i])
    neg_order = sorted((i for i in range(G) if not positive[i]), key=lambda i: -returns[i])
    n_kept = G
    while True:
        pos = [returns[i] for i in pos_order]
        neg = [returns[i] for i in neg_order]
        m = _margin_from_lists(pos, neg, mode)
        if m >= gamma:
            break  # (i) target satisfied
        if (n_kept - 1) / G < min_keep:
            break  # (iii) minimum retention reached
        candidates = []  # (improvement, side); a side must keep at least one response
        if len(pos) > 1:
            candidates.append((_margin_from_lists(pos[1:], neg, mode) - m, "pos"))
        if len(neg) > 1:
            candidates.append((_margin_from_lists(pos, neg[1:], mode) - m, "neg"))
        if not candidates:
            break
        best_gain, side = max(candidates, key=lambda c: c[0])  # ties: the positive side (listed first)
        if best_gain <= 0:
            break  # (ii) no beneficial removal
        order = pos_order if side == "pos" else neg_order
        keep[order.pop(0)] = False
        n_kept -= 1
    return keep


def margin_calibrate(
    returns_G: torch.Tensor,
    correct_G: torch.Tensor,
    *,
    gamma: float = 0.0,
    mode: str = "mean",
    strategy: str = "lift",
    min_keep: float = 0.5,
    threshold: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcome-guided margin calibration of one rollout group (Uni-OPD §3.4, A.4).

    Args:
        returns_G: distillation returns R(y) of the G responses (eq. 5), (G,).
        correct_G: outcome reward or correctness per response (bool or float), (G,); positives are
            responses with reward >= ``threshold`` (booleans: True).
        gamma: target margin γ.
        mode: "mean" or "minmax" margin (eq. 9).
        strategy: "lift" (+Δ on P), "suppress" (-Δ on N), "spread" (±Δ/2) (eq. 11, Alg. 2) or
            "mask" (greedy margin mask, Alg. 1).
        min_keep: for "mask", the smallest kept fraction of the group.
    Returns:
        (calibrated returns_G, keep_G bool). Shift strategies keep everything; after a shift the
        margin equals γ exactly and the order inside P and inside N is unchanged. "mask" zeroes the
        returns of dropped responses. When P or N is empty (margin undefined) or the margin already
        is >= γ, returns are unchanged.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    if not 0.0 <= min_keep <= 1.0:
        raise ValueError(f"min_keep must lie in [0, 1], got {min_keep}")
    if returns_G.dim() != 1 or correct_G.shape != returns_G.shape:
        raise ValueError(
            f"returns_G and correct_G must be 1-D of equal length, got {tuple(returns_G.shape)} and "
            f"{tuple(correct_G.shape)}"
        )
    positive_G = correct_G if correct_G.dtype == torch.bool else correct_G >= threshold
    returns_G = returns_G.detach().clone()
    keep_G = torch.ones_like(positive_G, dtype=torch.bool)
    m = margin(returns_G, positive_G, mode=mode)
    if m is None or m >= gamma:
        return returns_G, keep_G
    if strategy == "mask":
        keep = _greedy_mask(returns_G.tolist(), positive_G.tolist(), gamma, mode, min_keep)
        keep_G = torch.tensor(keep, dtype=torch.bool, device=returns_G.device)
        returns_G = torch.where(keep_G, returns_G, torch.zeros_like(returns_G))
        return returns_G, keep_G
    delta = gamma - m  # eq. 11: Δ = γ - m; both margins are translation-equivariant, so it lands exactly on γ
    lift = {"lift": delta, "suppress": 0.0, "spread": delta / 2}[strategy]
    drop = delta - lift
    returns_G = torch.where(positive_G, returns_G + lift, returns_G - drop)
    return returns_G, keep_G


def margin_calibrate_groups(
    returns_B: torch.Tensor, correct_B: torch.Tensor, group_ids_B: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``margin_calibrate`` to every prompt group of a flat batch (B responses, group ids (B,))."""
    if not returns_B.shape == correct_B.shape == group_ids_B.shape or returns_B.dim() != 1:
        raise ValueError(
            f"returns_B, correct_B and group_ids_B must be 1-D of equal length, got {tuple(returns_B.shape)}, "
            f"{tuple(correct_B.shape)}, {tuple(group_ids_B.shape)}"
        )
    out_B = returns_B.detach().clone()
    keep_B = torch.ones(returns_B.shape, dtype=torch.bool, device=returns_B.device)
    for gid in torch.unique(group_ids_B):
        idx = (group_ids_B == gid).nonzero(as_tuple=True)[0]
        out_B[idx], keep_B[idx] = margin_calibrate(returns_B[idx], correct_B[idx], **kwargs)
    return out_B, keep_B


def calibrated_token_advantages(
    token_rewards_BT: torch.Tensor,
    returns_before_B: torch.Tensor,
    returns_after_B: torch.Tensor,
    keep_B: torch.Tensor,
) -> torch.Tensor:
    """Token advantages after calibration: ``A_t = r_t + Δ_y`` for kept responses, 0 for dropped (§4).

    Args:
        token_rewards_BT: per-token rewards ``u_t - s_t``, (B, T).
        returns_before_B / returns_after_B: R(y) before and after ``margin_calibrate``, (B,).
        keep_B: keep mask from ``margin_calibrate``, (B,).
    """
    shift_B = torch.where(keep_B, returns_after_B - returns_before_B, torch.zeros_like(returns_after_B))
    adv_BT = token_rewards_BT.detach() + shift_B[:, None]
    return torch.where(keep_B[:, None], adv_BT, torch.zeros_like(adv_BT))
