"""What every TRL trainer mopd runs shares: tracker bridge, arguments, quiet progress, fit-and-save."""

from __future__ import annotations

import math

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class TrackerCallback(TrainerCallback):
    """Forward each `on_log` dict to the tracker as step metrics, and keep a history for plots."""

    def __init__(self, tracker, prefix: str = "train/"):
        self.tracker = tracker
        self.prefix = prefix
        self.history: dict[str, list[tuple[int, float]]] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {}
        for key, value in (logs or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                name = self.prefix + key.replace("/", "_")
                metrics[name] = float(value)
                self.history.setdefault(name, []).append((state.global_step, float(value)))
        if metrics:
            self.tracker.log_metrics(metrics, step=state.global_step)


def common_args(out_dir, max_steps: int, learning_rate: float, seed: int) -> dict:
    """TrainingArguments shared by every TRL trainer mopd runs: no checkpoints or hub pushes
    (the stage saves one safetensors checkpoint itself), no external reporters (mopd logs to
    MLflow through its tracker, with explicit run ids), deterministic seed."""
    return dict(
        output_dir=str(out_dir),
        max_steps=max_steps,
        learning_rate=learning_rate,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=False,
        use_cpu=not _cuda(),
        bf16=False,
        dataloader_num_workers=0,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class QuietProgressCallback(ProgressCallback):
    """transformers' progress bar without printing every step's metrics dict to stdout: the
    metrics go to the tracker (TrackerCallback), and the stage log stays readable."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None

    def on_step_end(self, args, state, control, **kwargs):
        from mopd.progress import report

        report(state.global_step, state.max_steps, "steps")
        return super().on_step_end(args, state, control, **kwargs)


def fit_and_save(trainer, tokenizer, out_dir, callback: TrackerCallback) -> dict[str, list[tuple[int, float]]]:
    """Train quietly, drop the trainer's scratch directory, save one safetensors checkpoint to
    ``out_dir/model``; return the metric history."""
    import shutil

    from mopd.models import save_checkpoint

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgressCallback())
    trainer.train()
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    save_checkpoint(trainer.model, tokenizer, out_dir / "model")
    return callback.history
