"""The GRPO recipe of a `teacher.<domain>` section (TRL GRPOTrainer), used by the teachers, CoPD's
Phase I and the GRPO baselines (`mopd.settings.baselines`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from mopd.settings.base import LoraOption, PosFloat, PosInt


class GRPOParams(LoraOption):
    """One teacher's GRPO recipe (TRL GRPOTrainer). Each domain may have its own."""

    max_steps: PosInt = 60
    learning_rate: PosFloat = 5e-4
    batch_size: PosInt = 32  # completions per step (prompts per step = batch_size / num_generations)
    num_generations: Annotated[int, Field(ge=2)] = 8
    max_completion_length: PosInt = 32
    temperature: PosFloat = 1.0
    beta: Annotated[float, Field(ge=0)] = 0.0  # KL coefficient to the reference (0 = none, as DAPO)
    epsilon: PosFloat = 0.2  # PPO clip
    checkpoint_every: PosInt | None = None  # in-stage checkpoints (transformers'); null = none
    snapshot_every: PosInt | None = None  # the model every this many steps (budget curve); null = none

    @model_validator(mode="after")
    def _divisible(self) -> "GRPOParams":
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of num_generations "
                f"({self.num_generations})"
            )
        return self
