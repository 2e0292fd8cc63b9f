"""Distillation objectives, calibrations and baselines (ALGORITHMS §1–§6), as pure tensor functions.

The package exports are resolved lazily (PEP 562): importing one submodule, e.g.
``mopd.objectives.balancing`` for the difficulty stage, does not import the others, so a stage's
code identity (:mod:`mopd.codedeps`) covers only the objectives it really uses.
"""

from __future__ import annotations

import importlib

# name -> submodule; read statically by mopd.codedeps (keep it a literal dict)
__mopd_lazy__ = {
    "masked_average": "_common",
    "UpsamplePlan": "balancing",
    "detect_shape": "balancing",
    "difficulty_histogram": "balancing",
    "online_balance": "balancing",
    "upsample_plan": "balancing",
    "calibrated_token_advantages": "calibration",
    "margin": "calibration",
    "margin_calibrate": "calibration",
    "margin_calibrate_groups": "calibration",
    "distillation_return": "opd",
    "response_return": "opd",
    "opd_advantage": "opd",
    "pg_loss": "opd",
    "pg_per_token": "opd",
    "topk_distill_loss": "opd",
    "topk_distill_loss_from_logprobs": "opd",
    "topk_distill_per_token": "opd",
    "trust_probability": "opd",
    "OBJECTIVES": "registry",
    "DistillBatch": "registry",
    "ObjectiveFn": "registry",
    "get_objective": "registry",
    "register_objective": "registry",
    "required_fields": "registry",
    "combine_teacher_logprobs": "routing",
    "copd_advantage": "routing",
    "copd_exchange_pairs": "routing",
    "group_advantages": "routing",
    "routing_weights": "routing",
    "teacher_weights": "routing",
    "validate_domain_weights": "routing",
    "cosine_prefix_length": "tropd",
    "entropy_top_mask": "tropd",
    "generalized_jsd_full": "tropd",
    "jsd_k1_advantage": "tropd",
    "jsd_topk_per_token": "tropd",
    "mask_outlier_advantage": "tropd",
    "prefix_guidance_loss": "tropd",
    "reopold_clip_advantage": "tropd",
    "topk_fkl_per_token": "tropd",
    "tropd_loss": "tropd",
    "trust_mask": "tropd",
}

__all__ = sorted(__mopd_lazy__)


def __getattr__(name: str):
    if name in __mopd_lazy__:
        value = getattr(importlib.import_module(f"{__name__}.{__mopd_lazy__[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__mopd_lazy__))
