"""The `multiround` section (MOPD §4.4.3)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from mopd.settings.base import PipelineFacts, Strict


class MultiRoundParams(Strict):
    """Multi-round MOPD (MOPD §4.4.3; ALGORITHMS §9), the pipeline entry `multiround`: round r's
    student initialises round r+1's teachers (`round_teacher:<r+1>:<domain>`, each domain's
    `teacher.<domain>` recipe) for `domains`, then MOPD again over those domains
    (`multiround:<r+1>`, the `distill` section) from round r's student. Round 1 is `distill`."""

    rounds: Annotated[int, Field(ge=2, le=8)] = 2  # MOPD rounds in all
    domains: list[str] = Field(default_factory=list)  # [] = every local-teacher domain (MOPD: math, IF)

    @staticmethod
    def student_stage(round: int) -> str:
        """The stage whose model is round ``round``'s student."""
        return "distill" if round == 1 else f"multiround:{round}"

    def check(self, facts: PipelineFacts) -> None:
        bad = sorted(set(self.domains) - set(facts.local_teachers))
        if bad:
            raise ValueError(f"{facts.key}.domains: {bad} are not domains of pipeline {facts.pipeline!r} whose "
                             f"teacher it trains ({list(facts.local_teachers)}); multi-round MOPD retrains teachers")
