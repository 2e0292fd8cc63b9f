"""Uni-OPD data balancing (ALGORITHMS §4; Uni-OPD A.1 offline difficulty, A.2 online correctness).

Offline: from each prompt's pass count c ∈ {0..N} (student, N samples) build the histogram h[c],
detect its shape (U / mirrored-J / flat) and plan how many times each prompt is repeated
(upsampling only: every prompt is kept at least once).
Online: subsample the over-represented side (correct or incorrect) inside each prompt group until
the batch's correct share is back in [ρ*-ε, ρ*+ε].
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "difficulty_histogram",
    "detect_shape",
    "UpsamplePlan",
    "upsample_plan",
    "online_balance",
]


def difficulty_histogram(pass_counts: Sequence[int] | np.ndarray, n_samples: int) -> np.ndarray:
    """Histogram ``h[c]`` of pass counts, shape (n_samples + 1,), int64."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    counts = np.asarray(pass_counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer) and counts.size:
        raise ValueError(f"pass_counts must be a 1-D sequence of integers, got dtype {counts.dtype} shape {counts.shape}")
    if counts.size and (counts.min() < 0 or counts.max() > n_samples):
        raise ValueError(f"pass_counts must lie in [0, {n_samples}], got range [{counts.min()}, {counts.max()}]")
    return np.bincount(counts.astype(np.int64), minlength=n_samples + 1)


def detect_shape(h: Sequence[int] | np.ndarray) -> str:
    """Shape of a difficulty histogram h[0..N] (§4): "U", "J" (mirrored-J) or "flat".

    U: both h[0] and h[N] exceed the mean of the middle bins h[1..N-1].
    Mirrored-J: h[N] is the largest bin and the mass falls toward c=0, which we read as: the lower
    half of the bins holds less mass than the upper half (our concrete rule; the paper shows a figure).
    """
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 1 or h.size < 3:
        raise ValueError(f"histogram must be 1-D with at least 3 bins (N >= 2), got shape {h.shape}")
    N = h.size - 1
    middle_mean = h[1:N].mean()
    if h[0] > middle_mean and h[N] > middle_mean:
        return "U"
    half = (N + 1) // 2
    if h[N] == h.max() and h[:half].sum() < h[N + 1 - half:].sum():
        return "J"
    return "flat"


@dataclass(frozen=True)
class UpsamplePlan:
    """Result of offline balancing. ``repeats[i]`` >= 1 copies of prompt i; h before/after recorded."""

    shape: str
    bins: tuple[int, ...]
    target: int
    repeats: np.ndarray
    hist_before: np.ndarray
    hist_after: np.ndarray

    def indices(self) -> np.ndarray:
        """Prompt indices with repetitions, ready to index the dataset, (sum(repeats),)."""
        return np.repeat(np.arange(self.repeats.size), self.repeats)


def _default_bins(shape: str, N: int) -> tuple[int, ...]:
    # Uni-OPD A.1: U -> upsample intermediate difficulty 1..N-1; mirrored-J -> all non-trivial 0..N-1.
    if shape == "U":
        return tuple(range(1, N))
    if shape == "J":
        return tuple(range(0, N))
    return ()


def upsample_plan(
    pass_counts: Sequence[int] | np.ndarray,
    n_samples: int,
    *,
    bins: Sequence[int] | None = None,
    cap: float = 4.0,
    shape_rule: Callable[[np.ndarray], str] = detect_shape,
    seed: int = 0,
) -> UpsamplePlan:
    """Plan offline difficulty-aware upsampling (Uni-OPD A.1, ALGORITHMS §4).

    Selected bins (default from the detected shape: U -> 1..N-1, J -> 0..N-1, flat -> none) are
    repeated until each reaches ``target = max over unselected bins`` but at most ``cap`` × its own
    size. Never drops: every prompt keeps at least one copy. When a bin needs a non-integer factor,
    the extra copies go to prompts chosen uniformly with ``seed``.

    Args:
        pass_counts: pass count c_i per prompt, (P,).
        n_samples: N, samples per prompt.
    """
    if cap < 1.0:
        raise ValueError(f"cap must be >= 1 (upsampling never drops), got {cap}")
    counts = np.asarray(pass_counts, dtype=np.int64)
    h = difficulty_histogram(counts, n_samples)
    shape = shape_rule(h)
    chosen = tuple(sorted(set(_default_bins(shape, n_samples) if bins is None else bins)))
    bad = [b for b in chosen if not 0 <= b <= n_samples]
    if bad:
        raise ValueError(f"bins {bad} outside [0, {n_samples}]")
    unselected = [c for c in range(n_samples + 1) if c not in chosen]
    target = int(h[unselected].max()) if unselected else int(h.max())
    rng = np.random.default_rng(seed)
    repeats = np.ones(counts.size, dtype=np.int64)
    for c in chosen:
        members = np.flatnonzero(counts == c)
        if members.size == 0:
            continue
        want = max(members.size, min(target, int(np.floor(cap * members.size))))
        base, extra = divmod(want, members.size)
        repeats[members] = base
        repeats[rng.choice(members, size=extra, replace=False)] += 1
    hist_after = np.bincount(counts, weights=repeats, minlength=n_samples + 1).astype(np.int64)
    logger.info("difficulty shape %s, bins %s, target %d: h %s -> %s", shape, chosen, target, h.tolist(),
                hist_after.tolist())
    return UpsamplePlan(shape, chosen, target, repeats, h, hist_after)


def online_balance(
    correct_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    *,
    target: float = 0.5,
    tol: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Online correctness-aware balancing (Uni-OPD A.2): keep mask (B,) bool.

    When the batch's correct share leaves ``[target-tol, target+tol]``, responses of the
    over-represented side are removed in a uniformly random order (so uniformly inside each group)
    until the share reaches the nearest bound — the minimal removal, our reading of "pulled back to
    the interval" — never removing the last response of a group. If that floor stops it early,
    the share stays outside and a warning is logged.

    Args:
        correct_B: bool correctness per response, (B,).
        group_ids_B: prompt group of each response, (B,).
    """
    if correct_B.dim() != 1 or group_ids_B.shape != correct_B.shape:
        raise ValueError(f"correct_B and group_ids_B must be 1-D of equal length, got {tuple(correct_B.shape)} "
                         f"and {tuple(group_ids_B.shape)}")
    if not (0.0 < target < 1.0 and 0.0 <= tol):
        raise ValueError(f"need 0 < target < 1 and tol >= 0, got target={target}, tol={tol}")
    correct = correct_B.bool().cpu()
    keep = torch.ones_like(correct)
    n, c = correct.numel(), int(correct.sum())
    if n == 0 or target - tol <= c / n <= target + tol:
        return keep.to(correct_B.device)
    over_correct = c / n > target + tol
    side = correct if over_correct else ~correct
    _, group_index = torch.unique(group_ids_B.cpu(), return_inverse=True)
    group_left = torch.bincount(group_index)
    order = torch.randperm(n, generator=generator)
    for i in order.tolist():
        if target - tol <= c / n <= target + tol:
            break
        if not side[i] or group_left[group_index[i]] <= 1:
            continue
        keep[i] = False
        group_left[group_index[i]] -= 1
        n -= 1
        c -= int(over_correct)
    if not target - tol <= (c / n) <= target + tol:
        logger.warning("online_balance: correct share %.3f still outside [%.3f, %.3f] (group floor of 1)",
                       c / n, target - tol, target + tol)
    return keep.to(correct_B.device)
