"""The analysis sections: `teacher_fit` (ALGORITHMS §8) and `weight_shift` (M2RL 3.3)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from mopd.settings.base import PosFloat, PosInt, Strict


class TeacherFitParams(Strict):
    """The `teacher_fit` analysis (ALGORITHMS §8): each method's reverse KL and top-k overlap to
    each domain's teacher along the method's own rollouts on `prompts` held-out prompts."""

    prompts: PosInt = 32  # per domain, from its eval split
    samples: PosInt = 1  # rollouts per prompt
    max_new_tokens: PosInt = 32
    temperature: PosFloat = 1.0
    topk: PosInt = 10


class WeightShiftParams(Strict):
    """The `weight_shift` analysis (M2RL 3.3): a weight changed when |Δw| > eta · max(|w_SFT|, |w_RL|)."""

    eta: Annotated[float, Field(gt=0, lt=1)] = 1e-3
