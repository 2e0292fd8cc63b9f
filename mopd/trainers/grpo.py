"""Stage 2: one RL teacher per domain: GRPO from the SFT checkpoint with the domain's verifier
as the reward (TRL GRPOTrainer). MOPD 3.1: teachers are trained independently per domain."""

from __future__ import annotations

import logging
from pathlib import Path

from mopd.config import GRPOParams
from mopd.models import load_model, load_tokenizer
from mopd.trainers.callbacks import TrackerCallback, common_args, fit_and_save

log = logging.getLogger(__name__)


def verifier_reward(kind: str):
    """A TRL reward function scoring completions with the domain's verifier (reward in [0, 1])."""
    from mopd.verifiers import verify_batch

    def reward(prompts, completions, reference, **kwargs) -> list[float]:
        verdicts = verify_batch([kind] * len(completions), list(completions), list(reference))
        return [v.reward for v in verdicts]

    reward.__name__ = f"{kind}_verifier"
    return reward


def train_grpo(sft_dir: Path, records: list[dict], kind: str, out_dir: Path, params: GRPOParams,
               seed: int, tracker) -> dict[str, list[tuple[int, float]]]:
    """Train a teacher from ``sft_dir`` on ``records`` (prompt + reference); save to ``out_dir``."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(sft_dir)
    model = load_model(sft_dir)
    dataset = Dataset.from_dict({
        "prompt": [r["prompt"] for r in records],
        "reference": [r["reference"] for r in records],
    })
    args = GRPOConfig(
        **common_args(out_dir / "_trainer", params.max_steps, params.learning_rate, seed),
        per_device_train_batch_size=params.batch_size,
        num_generations=params.num_generations,
        max_completion_length=params.max_completion_length,
        temperature=params.temperature,
        beta=params.beta,
        epsilon=params.epsilon,
        lr_scheduler_type="constant",
        loss_type="dapo",
    )
    callback = TrackerCallback(tracker)
    trainer = GRPOTrainer(model=model, reward_funcs=verifier_reward(kind), args=args,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])
    return fit_and_save(trainer, tokenizer, out_dir, callback)
