"""The `merge` section (mergekit methods)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from mopd.settings.base import PosFloat, Strict

MergeMethod = Literal["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "sce"]


class MergeParams(Strict):
    methods: list[MergeMethod] = Field(default_factory=lambda: ["linear", "task_arithmetic"], min_length=1)
    task_arithmetic_lambda: PosFloat = 0.5
    density: Annotated[float, Field(gt=0, le=1)] = 0.2
