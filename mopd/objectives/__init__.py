"""Distillation objectives, calibrations and baselines (ALGORITHMS §1–§6), as pure tensor functions."""

from mopd.objectives._common import masked_average
from mopd.objectives.opd import (
    distillation_return,
    opd_advantage,
    pg_loss,
    topk_distill_loss,
    topk_distill_loss_from_logprobs,
    trust_probability,
)

__all__ = [
    "distillation_return",
    "masked_average",
    "opd_advantage",
    "pg_loss",
    "topk_distill_loss",
    "topk_distill_loss_from_logprobs",
    "trust_probability",
]
