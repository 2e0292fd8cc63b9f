"""The on-policy loop: set up, step, checkpoint, save — one function for every method that trains a
student on its own rollouts (MOPD distillation and its variants, CoPD Phase II).

A method supplies its step as ``step_fn(step, pool) -> metrics`` (sampler, scorers, shapers and
update composed: :mod:`mopd.trainers.distill`, :mod:`mopd.trainers.copd`); the loop owns what
every method shares: the student and its optimiser, the teacher-cost ledger, the thread pool that
scores while the student samples, metrics and progress, in-stage checkpoints (resumed only under
the same cache key, :mod:`mopd.checkpoint`) and the saved model.
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from mopd import checkpoint as ckpt
from mopd import runtime
from mopd.chat import PromptFormat
from mopd.settings.base import LoraParams
from mopd.models import load_model, load_tokenizer, save_checkpoint
from mopd.rollout import encode_prompts
from mopd.progress import report
from mopd.snapshots import keep_snapshots, snapshot_dir, snapshot_staging
from mopd.teachers.ledger import Ledger, step_metrics

log = logging.getLogger(__name__)

History = dict[str, list[tuple[int, float]]]


@dataclass
class Student:
    """The model a loop trains, its tokenizer, the Python RNG stream its steps draw from, and the
    format it is asked its prompts in (mopd.chat)."""

    model: object
    tokenizer: object
    rng: random.Random
    fmt: PromptFormat

    @classmethod
    def load(cls, init_dir: Path, seed: int, fmt: PromptFormat, lora: LoraParams | None = None) -> "Student":
        """Seed torch and a Python stream with ``seed``, then load the trainable student (with LoRA
        adapters injected when ``lora`` is set: only they train; mopd.lora)."""
        torch.manual_seed(seed)
        rng = random.Random(seed)
        tokenizer = load_tokenizer(init_dir)
        fmt.check(tokenizer, f"the student {init_dir}'s tokenizer")
        model = load_model(init_dir, trained=True)
        if lora is not None:
            from mopd.lora import add_lora

            model = add_lora(model, lora)
        if runtime.current().gradient_checkpointing:  # runtime.gradient_checkpointing: memory for compute
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return cls(model, tokenizer, rng, fmt)

    def render(self, records: list[dict]) -> list[list[int]]:
        """The prompt ids of ``records`` as this student is asked them."""
        return encode_prompts(self.tokenizer, [r["prompt"] for r in records], self.fmt)


@dataclass(frozen=True)
class LoopPlan:
    """How long and where: ``steps`` optimiser steps (numbered from 1) shown as ``desc``;
    checkpoints every ``checkpoint_every`` steps under ``checkpoint`` made under ``key`` (none
    when either is None); the model saved every ``snapshot_every`` steps (the budget curve's
    points, ALGORITHMS §9) to ``out_dir/snapshots/step-N``; ``workers`` scoring threads named
    ``thread_prefix``; the ledger's per-step costs summed over data-parallel processes with
    ``trained_tokens_key`` (the metric the step reports its trained tokens under; None: one
    process, costs as they are)."""

    desc: str
    steps: int
    workers: int
    thread_prefix: str = "teacher"
    checkpoint: Path | None = None
    key: str = ""
    checkpoint_every: int | None = None
    trained_tokens_key: str | None = None
    snapshot_every: int | None = None


def one_thread() -> None:
    """Scoring threads run torch with one intra-op thread: an in-process teacher forward in a
    second thread with its own full-size OpenMP team oversubscribes the cores and slows the
    student's sampling ~2x on 2 cores (benchmarks/teacher_overlap.py --transport inprocess)."""
    torch.set_num_threads(1)


def train_loop(student: Student, optim, rollout, ledger: Ledger, tracker, out_dir: Path, plan: LoopPlan,
               step_fn: Callable[[int, ThreadPoolExecutor], dict[str, float]]) -> History:
    """Run ``step_fn`` for every step not yet done (resuming from ``plan.checkpoint`` when it holds
    a checkpoint of this key), log and record each step's metrics with the teachers' costs, save
    the model to ``out_dir/model`` (process 0) and return the metric history."""
    history: History = {}
    start = 1
    resumed = (ckpt.load(plan.checkpoint, key=plan.key, model=student.model, optim=optim, py_rng=student.rng)
               if plan.checkpoint else None)
    staging = snapshot_staging(plan.checkpoint, out_dir)
    if resumed is None and staging != out_dir:  # a fresh run: no snapshot of another run is kept
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    if resumed is not None:
        start, history = resumed.step + 1, resumed.history
        rollout.update_weights(student.model)
        log.warning("resumed from step %d (checkpoint %s)", resumed.step, plan.checkpoint)
        print(f"resumed from step {resumed.step}", flush=True)
        tracker.set_tags({"resumed_from_step": resumed.step})
        if hasattr(step_fn, "restore"):  # state a step carries across steps (Open-MOPD's anchors)
            step_fn.restore(history)
    with ThreadPoolExecutor(max_workers=plan.workers, thread_name_prefix=plan.thread_prefix,
                            initializer=one_thread) as pool:
        for step in tqdm(range(start, plan.steps + 1), desc=plan.desc, mininterval=5, initial=start - 1,
                         total=plan.steps):
            metrics = step_fn(step, pool)
            costs = step_metrics(ledger.step())
            if plan.trained_tokens_key:  # every process's costs and trained tokens
                costs |= {plan.trained_tokens_key: metrics[plan.trained_tokens_key]}
                costs = dict(zip(costs, runtime.all_reduce_sum(*costs.values())))
            metrics |= costs
            tracker.log_metrics(metrics, step=step)
            report(step, plan.steps, "steps")
            for k, v in metrics.items():
                history.setdefault(k, []).append((step, v))
            if plan.snapshot_every and step % plan.snapshot_every == 0 and step < plan.steps and runtime.is_main():
                from mopd.lora import plain_model  # staged with the checkpoints: a resumed run keeps them

                save_checkpoint(plain_model(student.model, copy=True), student.tokenizer, snapshot_dir(staging, step))
            if plan.checkpoint and plan.checkpoint_every and step % plan.checkpoint_every == 0 \
                    and step < plan.steps and runtime.is_main():  # the replicas are identical
                ckpt.save(plan.checkpoint, key=plan.key, step=step, model=student.model,
                          tokenizer=student.tokenizer, optim=optim, py_rng=student.rng, history=history)
    if runtime.is_main():
        from mopd.lora import plain_model

        save_checkpoint(plain_model(student.model), student.tokenizer, out_dir / "model")  # LoRA: merged
        keep_snapshots(staging, out_dir)  # the checkpoint stays until the record is written (tasks.runner)
    runtime.barrier()  # the other processes return once the model is on disk
    return history
