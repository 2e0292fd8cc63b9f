"""The `evaluate` section (ALGORITHMS §8)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from mopd.settings.base import PosFloat, PosInt, Strict


class EvaluateParams(Strict):
    """Sampling evaluation (ALGORITHMS §8): n samples per prompt give avg@k (mean reward, an
    unbiased estimate for any k <= n) and unbiased pass@k; intervals are bootstrap over prompts."""

    n: PosInt = 4  # samples per prompt
    k: PosInt = 4  # the k of avg@k / pass@k (k <= n)
    temperature: PosFloat = 1.0
    max_new_tokens: PosInt = 32
    batch_size: PosInt = 64
    ci_level: Annotated[float, Field(gt=0.5, lt=1)] = 0.95  # bootstrap interval level
    bootstrap: Annotated[int, Field(ge=100, le=100_000)] = 2000  # bootstrap resamples

    @model_validator(mode="after")
    def _k_le_n(self) -> "EvaluateParams":
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must be <= n ({self.n}): pass@k needs n >= k samples")
        return self
