"""The integration baselines' sections (MOPD Table 2; ALGORITHMS §9): `mix_rl` and `cascade_rl`.
Apart from the teachers' recipe module, so that editing a baseline's settings reruns that baseline
only."""

from __future__ import annotations

from pydantic import Field

from mopd.settings.base import PipelineFacts, PosFloat, PosInt, Strict, check_shares
from mopd.settings.grpo import GRPOParams


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
