"""Stage 1: supervised fine-tuning of the base model on gold completions (TRL SFTTrainer)."""

from __future__ import annotations

import logging
from pathlib import Path

from mopd.config import SFTParams
from mopd.models import load_model, load_tokenizer
from mopd.trainers.callbacks import TrackerCallback, common_args, fit_and_save

log = logging.getLogger(__name__)


def train_sft(base_dir: Path, records: list[dict], out_dir: Path, params: SFTParams, seed: int,
              tracker) -> dict[str, list[tuple[int, float]]]:
    """Fine-tune ``base_dir`` on prompt/completion ``records``; save the model to ``out_dir``.

    Loss on completion tokens only (TRL's prompt-completion format). Returns the metric history."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir)
    dataset = Dataset.from_dict({
        "prompt": [r["prompt"] for r in records],
        "completion": [r["completion"] for r in records],
    })
    args = SFTConfig(
        **common_args(out_dir / "_trainer", params.max_steps, params.learning_rate, seed),
        per_device_train_batch_size=params.batch_size,
        warmup_steps=params.warmup_ratio,  # a float < 1 is a ratio of max_steps in transformers 5
        lr_scheduler_type="cosine",
        max_length=params.max_length,
        completion_only_loss=True,
        dataset_num_proc=None,
    )
    callback = TrackerCallback(tracker)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[callback])
    return fit_and_save(trainer, tokenizer, out_dir, callback)
