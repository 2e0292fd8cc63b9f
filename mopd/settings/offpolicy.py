"""The `offpolicy_ft` section (MOPD Table 2)."""

from __future__ import annotations

from mopd.settings.base import PosFloat, PosInt, Prob, Strict
from mopd.settings.sft import SFTParams


class OffPolicyFTParams(Strict):
    """Off-policy fine-tuning (MOPD Table 2; ALGORITHMS §9), the stage `offpolicy_ft`: each
    domain's teacher samples `samples_per_prompt` responses to `max_prompts` of its training
    prompts; the domain's verifier keeps the correct ones (reward >= `threshold`; all of them with
    `correct_only: false`); the SFT student is fine-tuned on what is kept (`sft` recipe)."""

    samples_per_prompt: PosInt = 4
    max_prompts: PosInt = 256  # per domain
    temperature: PosFloat = 1.0
    max_new_tokens: PosInt = 32
    correct_only: bool = True
    threshold: Prob = 1.0  # rewards lie in [0, 1]
    sft: SFTParams = SFTParams(max_steps=150, learning_rate=5e-4)
