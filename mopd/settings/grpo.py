"""GRPO recipes: the `teacher.<domain>` sections, `mix_rl` and `cascade_rl` (MOPD Table 2)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from mopd.settings.base import PipelineFacts, PosFloat, PosInt, Strict, check_shares


class GRPOParams(Strict):
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

    @model_validator(mode="after")
    def _divisible(self) -> "GRPOParams":
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of num_generations "
                f"({self.num_generations})"
            )
        return self


class MixRLParams(GRPOParams):
    """Mix-RL (MOPD Table 2; ALGORITHMS §9), the stage `mix_rl`: one GRPO run from the SFT student
    on the pooled training prompts of every domain, each prompt rewarded by its own domain's
    verifier. Every step's prompts hold the domains in the ratio `domain_weights` (to within one
    prompt). The default budget is the teachers' steps combined (compute-matched)."""

    max_steps: PosInt = 600
    domain_weights: dict[str, PosFloat] | None = None  # per-batch domain shares; None = uniform

    def check(self, facts: PipelineFacts) -> None:
        check_shares(facts.key, self.domain_weights, facts)


class CascadeRLParams(Strict):
    """Cascade RL (ALGORITHMS §9), the stages `cascade_rl:<domain>`: GRPO on one domain after the
    other in `order`, each from the previous stage's model (the first from SFT), each with its
    domain's `teacher.<domain>` recipe. The last stage's model is the method `cascade_rl`."""

    order: list[str] = Field(default_factory=list)  # [] = the pipeline's local-teacher domains

    def check(self, facts: PipelineFacts) -> None:
        order = self.order or list(facts.local_teachers)
        if len(order) < 2:
            raise ValueError(f"{facts.key}.order = {order}: a cascade needs at least two domains "
                             f"(with one it is that domain's teacher)")
        dup = sorted({d for d in order if order.count(d) > 1})
        bad = [d for d in order if d not in facts.local_teachers]
        if dup or bad:
            raise ValueError(f"{facts.key}.order = {order}: " + (
                f"{dup} listed more than once" if dup else
                f"{bad} are not domains of pipeline {facts.pipeline!r} with a GRPO recipe here "
                f"({list(facts.local_teachers)})"))
