"""The `sft` section (and the SFT recipe of off-policy fine-tuning)."""

from __future__ import annotations

from pydantic import Field  # noqa: F401

from mopd.settings.base import LoraOption, PosFloat, PosInt, Prob


class SFTParams(LoraOption):
    max_steps: PosInt = 300
    learning_rate: PosFloat = 3e-3
    batch_size: PosInt = 32
    warmup_ratio: Prob = 0.05
    max_length: PosInt = 96
    checkpoint_every: PosInt | None = None  # in-stage checkpoints (transformers'); null = none
