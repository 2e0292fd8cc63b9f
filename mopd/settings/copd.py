"""The `copd` section (ALGORITHMS §6)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from mopd.settings.base import PipelineFacts, PosFloat, PosInt, Strict
from mopd.settings.merge import MergeMethod


class CoPDOPDParams(Strict):
    """CoPD Phase II (ALGORITHMS §6; CoPD §3.2-3.3, Alg. 1 lines 8-13): one optimiser step per
    batch of native GRPO rollouts (`native_prompts` of the branch's own prompts x `group_size`,
    its verifier's reward, group-normalised advantages) plus, for every exchange partner j,
    `cross_prompts` of D_j x `cross_samples` rollouts of this branch, token advantage
    `beta * clip(log pi_j - log pi_k)` with the partner's current weights as teacher."""

    learning_rate: PosFloat = 1e-4
    native_prompts: PosInt = 4
    group_size: Annotated[int, Field(ge=2)] = 8
    cross_prompts: PosInt = 8
    cross_samples: PosInt = 2
    beta: PosFloat = 1.0  # β_k, the weight of the cross-branch advantage
    clip: PosFloat | None = 5.0  # two-sided clip of log pi_j - log pi_k (as distill.clip); null = none
    max_new_tokens: PosInt = 32
    temperature: PosFloat = 1.0


class CoPDParams(Strict):
    """CoPD (ALGORITHMS §6), the pipeline entry `copd`: K branches from the SFT checkpoint, one
    per domain in `branches`; `cycles` cycles of Phase I (`rl_steps` GRPO steps on the branch's
    domain with its `teacher.<domain>` recipe, stage `copd:<n>:rl:<domain>`) and Phase II
    (`opd_steps` steps of mutual OPD, stage `copd:<n>:opd:<domain>`); K > 2 exchanges
    hub-and-spoke through `hub`. The final branches are merged with `merge_method` (stage
    `copd_merge`, method `copd`); `copd_monitor` measures top-k overlap and symmetric KL between
    exchange partners after every phase."""

    branches: list[str] = Field(default_factory=list)  # [] = the pipeline's local-teacher domains
    hub: str | None = None  # K > 2: the branch that exchanges with every other (CoPD §3.3)
    cycles: Annotated[int, Field(ge=1, le=16)] = 2
    rl_steps: PosInt = 60  # S_RL per cycle (the paper's best S_RL : S_OPD = 1.5 : 1)
    opd_steps: PosInt = 40  # S_OPD per cycle
    opd: CoPDOPDParams = CoPDOPDParams()
    merge_method: MergeMethod = "linear"
    task_arithmetic_lambda: PosFloat = 0.5  # used by merge_method task_arithmetic
    density: Annotated[float, Field(gt=0, le=1)] = 0.2  # used by ties / dare_*
    monitor_prompts: PosInt = 16  # per domain, for copd_monitor's rollouts
    monitor_topk: PosInt = 10  # the k of the top-k overlap (CoPD: 10)

    shapes_graph: ClassVar[bool] = True  # its branches and hub expand into stages: checked for every pipeline

    def check(self, facts: PipelineFacts) -> None:
        """The branches are >= 2 distinct domains of the pipeline with a GRPO recipe; K > 2 needs a
        hub among them (K = 2 exchanges both ways and ignores `hub`)."""
        branches = self.branches or list(facts.local_teachers)
        dup = sorted({d for d in branches if branches.count(d) > 1})
        bad = [d for d in branches if d not in facts.local_teachers]
        if len(branches) < 2 or dup or bad:
            raise ValueError(f"{facts.key}.branches = {branches}: " + (
                "CoPD needs at least two branches" if len(branches) < 2 else
                f"{dup} listed more than once" if dup else
                f"{bad} are not domains of pipeline {facts.pipeline!r} with a GRPO recipe here "
                f"({list(facts.local_teachers)})"))
        if len(branches) > 2 and self.hub not in branches:
            raise ValueError(f"{facts.key}.hub = {self.hub!r}: with {len(branches)} branches CoPD exchanges "
                             f"hub-and-spoke and needs a hub among copd.branches {branches}")
