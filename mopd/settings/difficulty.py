"""The `difficulty` section (Uni-OPD A.1)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from mopd.settings.base import PosFloat, PosInt, Prob, Strict


class DifficultyParams(Strict):
    """Uni-OPD A.1 offline difficulty (ALGORITHMS §4): N student samples per prompt."""

    n_samples: Annotated[int, Field(ge=2)] = 8
    temperature: PosFloat = 1.0
    max_new_tokens: PosInt = 32
    # training prompts scored per domain to estimate the histogram (a random subset); the
    # balanced set handed to distillation holds every training prompt (mopd.difficulty.balance_all)
    max_prompts: PosInt = 256
    success_threshold: Prob = 1.0  # reward >= this counts as a pass
    bins: list[Annotated[int, Field(ge=0)]] | None = None  # None: from the shape (U: 1..N-1, J: 0..N-1)
    cap: Annotated[float, Field(ge=1)] = 4.0
    batch_size: PosInt = 64

    @model_validator(mode="after")
    def _bins_in_range(self) -> "DifficultyParams":
        bad = [b for b in self.bins or [] if b > self.n_samples]
        if bad:
            raise ValueError(f"bins {bad} exceed n_samples ({self.n_samples})")
        return self
