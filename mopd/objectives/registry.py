"""The distillation losses (ALGORITHMS §1, §2, §5) over one :class:`DistillBatch`, and
:data:`OBJECTIVES`, the view of the method registry (:mod:`mopd.opd.methods`) that resolves each
method's loss.

A loss is ``fn(batch: DistillBatch, **params) -> (loss, metrics)``; what it needs from the batch,
which settings it takes and what it combines with are declared once, in its
:class:`~mopd.opd.methods.MethodSpec`, never here. :func:`get_objective` returns the loss
wrapped with a check that the batch holds every field the spec requires.

``old_student_logprobs_BT`` are the rollout policy's log-probs; they default to the detached
current log-probs (one optimiser step per rollout batch, ρ = 1). Advantages and trust masks are
computed from them, so that with several optimiser steps per rollout batch (`distill.epochs`,
`distill.minibatches`) they stay fixed, as GRPO's do, while the PPO ratio moves (§1).
``advantages_BT``, when given, replaces ``u - s`` in the PG objectives (Uni-OPD calibrated
advantages, CoPD cross-branch advantages).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from mopd.objectives._common import masked_average
from mopd.objectives.opd import opd_advantage, pg_per_token, topk_distill_per_token
from mopd.objectives.tropd import (
    entropy_top_mask,
    jsd_k1_advantage,
    jsd_topk_per_token,
    mask_outlier_advantage,
    prefix_guidance_loss,
    reopold_clip_advantage,
    topk_fkl_per_token,
    tropd_loss,
    trust_mask,
)
from mopd.opd.methods import METHODS, MethodSpec, NoParams, get_method, register_method

__all__ = ["DistillBatch", "ObjectiveFn", "OBJECTIVES", "register_objective", "get_objective", "required_fields"]

ObjectiveFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==
class DistillBatch:
    """Tensors one distillation step may need; each objective uses a subset (see module table).

    Shapes: B sequences × T positions (response positions; ``mask_BT`` marks real response tokens),
    K teacher top-k entries per position.
    """

    mask_BT: torch.Tensor
    student_logprobs_BT: torch.Tensor | None = None  # with grad
    old_student_logprobs_BT: torch.Tensor | None = None
    teacher_logprobs_BT: torch.Tensor | None = None
    advantages_BT: torch.Tensor | None = None
    teacher_topk_ids_BTK: torch.Tensor | None = None
    teacher_topk_logprobs_BTK: torch.Tensor | None = None
    student_topk_logprobs_BTK: torch.Tensor | None = None  # student log-probs at the teacher's ids, with grad
    student_entropy_BT: torch.Tensor | None = None
    prefix_student_logprobs_BT: torch.Tensor | None = None  # TrOPD off-policy prefix tokens, with grad
    prefix_mask_BT: torch.Tensor | None = None

    def require(self, names: tuple[str, ...], objective: str) -> None:
        """Raise ValueError naming every required field that is None."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"objective {objective!r} needs DistillBatch field(s) {missing}, which are None")


_FIELDS = {f.name for f in dataclasses.fields(DistillBatch)}


def _checked(spec: MethodSpec) -> ObjectiveFn:
    fn = spec.loss_fn()

    def checked(batch: DistillBatch, **params) -> tuple[torch.Tensor, dict[str, float]]:
        batch.require(spec.requires, spec.name)
        return fn(batch, **params)

    checked.__name__, checked.__doc__ = fn.__name__, fn.__doc__
    checked.__wrapped__ = fn  # type: ignore[attr-defined]
    return checked


class _Objectives(Mapping):
    """``name -> checked loss`` for every registered method (a live view of METHODS)."""

    def __getitem__(self, name: str) -> ObjectiveFn:
        return _checked(METHODS[name])

    def __iter__(self) -> Iterator[str]:
        return iter(list(METHODS))

    def __len__(self) -> int:
        return len(METHODS)


OBJECTIVES: Mapping[str, ObjectiveFn] = _Objectives()


def get_objective(name: str) -> ObjectiveFn:
    """The loss of method ``name``, checking the batch fields its spec requires; ValueError listing
    the registered names otherwise."""
    return _checked(get_method(name))


def required_fields(name: str) -> tuple[str, ...]:
    """DistillBatch fields the method ``name`` needs."""
    return get_method(name).requires


def register_objective(name: str, *, requires: tuple[str, ...]) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator for a loss defined in process (a notebook, a test): registers a method spec with
    no settings of its own. A method meant to run in a pipeline registers a full spec from a module
    of :mod:`mopd.opd.plugins` (docs/methods.md)."""
    unknown = sorted(set(requires) - _FIELDS)
    if unknown:  # refused at once, before a function is given
        raise ValueError(f"objective {name!r}: unknown DistillBatch field(s) {unknown}")

    def wrap(fn: ObjectiveFn) -> ObjectiveFn:
        register_method(MethodSpec(name, fn, NoParams, tuple(requires)))
        return fn

    return wrap


# --------------------------------------------------------------------------- helpers


def _old(batch: DistillBatch) -> torch.Tensor:
    old = batch.old_student_logprobs_BT
    return batch.student_logprobs_BT.detach() if old is None else old


def _pg(batch: DistillBatch, adv_BT: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    return pg_per_token(batch.student_logprobs_BT, _old(batch), adv_BT, batch.mask_BT,
                        eps_low=eps_low, eps_high=eps_high)


def _mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    m = mask_BT.bool()
    return float(values_BT.detach()[m].double().mean()) if m.any() else 0.0


def _k1_metrics(batch: DistillBatch) -> dict[str, float]:
    if batch.teacher_logprobs_BT is None or batch.student_logprobs_BT is None:
        return {}
    return {"reverse_kl_k1": _mean(batch.student_logprobs_BT - batch.teacher_logprobs_BT, batch.mask_BT)}


# --------------------------------------------------------------------------- objectives


def mopd_pg(batch: DistillBatch, *, clip: float | None = 5.0, eps_low: float = 0.2, eps_high: float = 0.2,
            token_mean: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """§1 K1 policy-gradient OPD. Uses ``advantages_BT`` when given, else clip(u - s)."""
    if batch.advantages_BT is not None:
        adv_BT = batch.advantages_BT.detach()
    else:
        batch.require(("teacher_logprobs_BT",), "mopd_pg")
        adv_BT = opd_advantage(batch.teacher_logprobs_BT, _old(batch), clip=clip)
    loss = masked_average(_pg(batch, adv_BT, eps_low, eps_high), batch.mask_BT, token_mean=token_mean)
    return loss, {"loss": float(loss.detach()), "advantage_mean": _mean(adv_BT, batch.mask_BT), **_k1_metrics(batch)}


def mopd_topk(batch: DistillBatch, *, token_mean: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """§2 top-k distillation with the -p+q truncation correction."""
    per_BT = topk_distill_per_token(batch.student_topk_logprobs_BTK, batch.teacher_topk_logprobs_BTK.detach())
    loss = masked_average(per_BT, batch.mask_BT, token_mean=token_mean)
    return loss, {"loss": float(loss.detach()), **_k1_metrics(batch)}


def tropd(batch: DistillBatch, *, clip: float | None = None, eps_low: float = 0.2, eps_high: float = 0.2,
          prefix_beta: float = 0.001, generator: torch.Generator | None = None,
          token_mean: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """§5 TrOPD: K1 PG on Bernoulli-trusted tokens, top-k FKL on outliers, β·NLL on teacher prefixes."""
    trust_BT = trust_mask(batch.teacher_logprobs_BT, _old(batch), generator=generator)
    adv_BT = opd_advantage(batch.teacher_logprobs_BT, _old(batch), clip=clip)
    pg_BT = _pg(batch, adv_BT, eps_low, eps_high)
    fkl_BT = topk_fkl_per_token(batch.student_topk_logprobs_BTK, batch.teacher_topk_logprobs_BTK)
    loss = tropd_loss(pg_BT, fkl_BT, trust_BT, batch.mask_BT, token_mean=token_mean)
    metrics = {"trust_fraction": _mean(trust_BT.double(), batch.mask_BT), **_k1_metrics(batch)}
    if batch.prefix_student_logprobs_BT is not None:
        if batch.prefix_mask_BT is None:
            raise ValueError("objective 'tropd': prefix_student_logprobs_BT given without prefix_mask_BT")
        guide = prefix_guidance_loss(batch.prefix_student_logprobs_BT, batch.prefix_mask_BT, beta=prefix_beta,
                                     token_mean=token_mean)
        metrics["prefix_loss"] = float(guide.detach())
        loss = loss + guide
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def _pg_with(batch: DistillBatch, adv_BT: torch.Tensor, mask_BT: torch.Tensor, eps_low: float, eps_high: float,
             token_mean: bool) -> tuple[torch.Tensor, dict[str, float]]:
    loss = masked_average(_pg(batch, adv_BT, eps_low, eps_high), mask_BT, token_mean=token_mean)
    return loss, {"loss": float(loss.detach()), "advantage_mean": _mean(adv_BT, mask_BT), **_k1_metrics(batch)}


def clip_outlier(batch: DistillBatch, *, tau: float = -5.0, eps_low: float = 0.2, eps_high: float = 0.2,
                 token_mean: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """§5 baseline Clip Outlier: PG with REOPOLD's clipped advantage r = max(u - s, τ)
    (:func:`~mopd.objectives.tropd.reopold_clip_advantage`)."""
    adv_BT = reopold_clip_advantage(batch.teacher_logprobs_BT, _old(batch), tau=tau)
    return _pg_with(batch, adv_BT, batch.mask_BT, eps_low, eps_high, token_mean)


def mask_outlier(batch: DistillBatch, *, tau: float = -5.0, eps_low: float = 0.2, eps_high: float = 0.2,
                 token_mean: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """§5 baseline Mask Outlier: PG with r = 1[u - s > τ](u - s)."""
    adv_BT = mask_outlier_advantage(batch.teacher_logprobs_BT, _old(batch), tau=tau)
    return _pg_with(batch, adv_BT, batch.mask_BT, eps_low, eps_high, token_mean)


def entropy_opd(batch: DistillBatch, *, frac: float = 0.2, clip: float | None = None, eps_low: float = 0.2,
                eps_high: float = 0.2, token_mean: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """§5 baseline Entropy-OPD: §1 PG only on the top ``frac`` highest-entropy tokens of the batch."""
    sel_BT = entropy_top_mask(batch.student_entropy_BT, batch.mask_BT, frac=frac)
    adv_BT = opd_advantage(batch.teacher_logprobs_BT, _old(batch), clip=clip)
    return _pg_with(batch, adv_BT, sel_BT, eps_low, eps_high, token_mean)


def jsd(batch: DistillBatch, *, beta: float = 0.5, eps_low: float = 0.2, eps_high: float = 0.2,
        token_mean: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """§5 baseline JSD(β): β·top-k KL(q ‖ m) (direct) + (1-β)·K1 KL(p ‖ m) (policy gradient)."""
    direct_BT = jsd_topk_per_token(batch.student_topk_logprobs_BTK, batch.teacher_topk_logprobs_BTK, beta=beta)
    adv_BT = jsd_k1_advantage(batch.teacher_logprobs_BT, _old(batch), beta=beta)
    per_BT = direct_BT + _pg(batch, adv_BT, eps_low, eps_high)
    loss = masked_average(per_BT, batch.mask_BT, token_mean=token_mean)
    return loss, {"loss": float(loss.detach()), "jsd_topk": _mean(direct_BT, batch.mask_BT), **_k1_metrics(batch)}


def topk_fkl(batch: DistillBatch, *, token_mean: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """§5 baseline top-k forward KL on every token (TrOPD Table 1: collapses; kept as a baseline)."""
    per_BT = topk_fkl_per_token(batch.student_topk_logprobs_BTK, batch.teacher_topk_logprobs_BTK)
    loss = masked_average(per_BT, batch.mask_BT, token_mean=token_mean)
    return loss, {"loss": float(loss.detach()), **_k1_metrics(batch)}
