"""Shared helpers for the objectives: input checks and the two masked averagings (ALGORITHMS §1)."""

from __future__ import annotations

import torch

__all__ = ["check_same_shape", "masked_average", "check_mask"]


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ValueError naming the arguments when the given tensors differ in shape."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.shape != t0.shape:
            raise ValueError(
                f"shape mismatch: {name0} has shape {tuple(t0.shape)} but {name} has shape {tuple(t.shape)}"
            )


def check_mask(mask_BT: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    """Raise ValueError when ``mask_BT`` does not match the leading B×T dims of ``like``."""
    if mask_BT.shape != like.shape[: mask_BT.dim()] or mask_BT.dim() != 2:
        raise ValueError(
            f"mask_BT must be 2-D with shape (B, T) matching {like_name} {tuple(like.shape)}, "
            f"got {tuple(mask_BT.shape)}"
        )


def masked_average(values_BT: torch.Tensor, mask_BT: torch.Tensor, *, token_mean: bool = False) -> torch.Tensor:
    """Average per-token values over response tokens.

    ALGORITHMS §1: by default mean over the tokens of each sequence, then mean over the sequences
    that have at least one response token; ``token_mean=True`` gives the token-mean over the batch.
    A batch with no response token returns 0 (still connected to the graph so backward works).

    Args:
        values_BT: per-token values, shape (B, T).
        mask_BT: 1 for response tokens, 0 for prompt/padding, shape (B, T) (bool or float).
    Returns:
        scalar tensor.
    """
    check_mask(mask_BT, values_BT, "values_BT")
    m_BT = mask_BT.to(values_BT.dtype)
    # where, not multiply: padding positions may hold inf/nan (e.g. -inf logprobs) and 0*inf = nan.
    masked_BT = torch.where(mask_BT.bool(), values_BT, torch.zeros_like(values_BT))
    if token_mean:
        return masked_BT.sum() / m_BT.sum().clamp(min=1.0)
    count_B = m_BT.sum(dim=-1)
    per_seq_B = masked_BT.sum(dim=-1) / count_B.clamp(min=1.0)
    valid_B = (count_B > 0).to(values_BT.dtype)
    return (per_seq_B * valid_B).sum() / valid_B.sum().clamp(min=1.0)
