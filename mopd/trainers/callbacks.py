"""What every TRL trainer mopd runs shares: tracker bridge, arguments, quiet progress, fit-and-save."""

from __future__ import annotations

import math

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from mopd import runtime


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


KEEP_CHECKPOINTS = 2  # transformers' save_total_limit for the TRL stages' in-stage checkpoints

def common_args(out_dir, max_steps: int, learning_rate: float, seed: int, *, checkpoint=None,
                checkpoint_every: int | None = None) -> dict:
    """TrainingArguments shared by every TRL trainer mopd runs: no hub pushes, no external
    reporters (mopd logs to MLflow through its tracker, with explicit run ids), deterministic
    seed. With ``checkpoint`` and ``checkpoint_every``: transformers' own checkpoints (model in
    safetensors, optimiser / scheduler / RNG states read back with ``weights_only=True``) every
    that many steps into ``checkpoint``, the last two kept (a newest one found damaged falls back
    one checkpoint, not to step 0); otherwise none (the stage saves one safetensors model itself)."""
    saving = dict(save_strategy="no")
    if checkpoint is not None and checkpoint_every:
        saving = dict(save_strategy="steps", save_steps=checkpoint_every, save_total_limit=KEEP_CHECKPOINTS)
    return dict(
        output_dir=str(checkpoint if checkpoint is not None and checkpoint_every else out_dir),
        max_steps=max_steps,
        learning_rate=learning_rate,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        **saving,
        report_to=[],
        disable_tqdm=False,
        **runtime.current().trainer_args(),  # the stage's device; mixed precision in its dtype
        dataloader_num_workers=0,
    )


def per_process(batch_size: int, key: str = "batch_size") -> int:
    """Each data-parallel process's share of a step's batch (`runtime.processes` processes take the
    one-process step together: the global batch stays ``batch_size``)."""
    world = runtime.world_size()
    if batch_size % world:
        raise ValueError(f"{key} = {batch_size} is not a multiple of the {world} data-parallel processes "
                         "(runtime.processes): each process takes an equal share of the batch")
    return batch_size // world


class SnapshotCallback(TrainerCallback):
    """Save the model every ``every`` steps before the last to ``root/snapshots/step-N`` (the budget
    curve's points; :func:`mopd.opd.loop.snapshot_staging` says where ``root`` is)."""

    def __init__(self, every: int, root, tokenizer):
        self.every, self.root, self.tokenizer = every, root, tokenizer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps and state.is_world_process_zero:
            from mopd.lora import plain_model
            from mopd.models import save_checkpoint
            from mopd.snapshots import snapshot_dir

            save_checkpoint(plain_model(model, copy=True), self.tokenizer, snapshot_dir(self.root, state.global_step))


class QuietProgressCallback(ProgressCallback):
    """transformers' progress bar without printing every step's metrics dict to stdout: the
    metrics go to the tracker (TrackerCallback), and the stage log stays readable."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None

    def on_step_end(self, args, state, control, **kwargs):
        from mopd.progress import report

        if state.is_world_process_zero:
            report(state.global_step, state.max_steps, "steps")
        if state.global_step >= state.max_steps:
            # transformers also checkpoints the last step; the stage saves the final model itself
            # and removes its checkpoints, so that one would be written for nothing
            control.should_save = False
        return super().on_step_end(args, state, control, **kwargs)


def fit_and_save(trainer, tokenizer, out_dir, callback: TrackerCallback, *, checkpoint=None,
                 key: str = "", snapshot_every: int | None = None) -> dict[str, list[tuple[int, float]]]:
    """Train quietly, drop the trainer's scratch directory, save one safetensors checkpoint to
    ``out_dir/model``; return the metric history. With ``checkpoint`` (the trainer's checkpoint
    directory): resume from its last checkpoint when one was made under the same ``key`` (the
    stage's cache key; another key raises CheckpointMismatch), and remove it once finished.
    ``snapshot_every``: the model every that many steps in ``out_dir/snapshots`` (kept across a
    resume: staged beside the checkpoint until the end)."""
    import json
    import shutil
    from pathlib import Path

    from mopd.models import save_checkpoint

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgressCallback())
    # where the trainer put the model, and the mixed precision its arguments ask for
    a = trainer.args
    runtime.record(trainer.model, amp="bfloat16" if a.bf16 else "float16" if a.fp16 else None)
    main = runtime.is_main()  # under `accelerate launch` only process 0 writes files
    last = None
    if checkpoint is not None and trainer.args.save_strategy != "no":
        checkpoint = Path(checkpoint)
        expected = {k: tuple(v.shape) for k, v in trainer.model.state_dict().items()}  # what a checkpoint must fit
        last = _resume_point(checkpoint, key, main, expected)
    from mopd.snapshots import keep_snapshots, snapshot_staging

    staging = snapshot_staging(None if checkpoint is None else Path(checkpoint), Path(out_dir))
    if last is None and staging != Path(out_dir) and main:  # a fresh run keeps no snapshot of another
        shutil.rmtree(staging, ignore_errors=True)
    if snapshot_every:
        trainer.add_callback(SnapshotCallback(snapshot_every, staging, tokenizer))
    if last is not None:
        state = json.loads((Path(last) / "trainer_state.json").read_text())
        step = int(state["global_step"])
        for entry in state.get("log_history", []):  # the curves of the steps before the kill
            callback.on_log(trainer.args, type("S", (), {"global_step": entry.get("step", 0)})(), None,
                            logs={k: v for k, v in entry.items() if k != "step"})
        print(f"resumed from step {step}", flush=True)
        callback.tracker.set_tags({"resumed_from_step": step})
    trainer.train(resume_from_checkpoint=last)
    runtime.barrier()
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        # sharded (accelerate's FSDP / ZeRO-3): gathering the full state dict is a collective
        # every process takes part in; transformers writes it as safetensors from process 0
        trainer.save_model(str(out_dir / "model"))
        if main:
            tokenizer.save_pretrained(out_dir / "model")
    elif main:
        from mopd.lora import plain_model

        save_checkpoint(plain_model(trainer.model), tokenizer, out_dir / "model")  # LoRA: merged weights
    if main:
        shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
        keep_snapshots(staging, Path(out_dir))  # checkpoints stay until the record is written (tasks.runner)
    runtime.barrier()
    return callback.history


def _resume_point(checkpoint, key: str, main: bool, expected: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """The checkpoint to resume from (None: start afresh), after checking that the folder's
    checkpoints were made under ``key`` (CheckpointMismatch otherwise) and marking it with it."""
    import json

    from mopd.checkpoint import CheckpointMismatch, set_aside

    mark = checkpoint / "key.json"
    made = None
    if mark.is_file():
        try:
            made = json.loads(mark.read_text())["key"]
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
            made = e
    runtime.barrier()  # every process has read the mark before process 0 changes anything
    if isinstance(made, Exception):  # whose checkpoints these are is unknown: none is trusted
        if main:
            set_aside(checkpoint, checkpoint, f"key.json unreadable: {made}")
        made = None
    elif made is not None and made != key:
        raise CheckpointMismatch(
            f"{checkpoint}: checkpoints of this stage were made with cache key {made[:12]}, but the "
            f"stage now has key {key[:12]} (its configuration, upstream outputs or code changed since): "
            f"it will not resume from them. Delete {checkpoint} to start the stage afresh.")
    if main:
        checkpoint.mkdir(parents=True, exist_ok=True)
        mark.write_text(json.dumps({"key": key}))
        _last_complete(checkpoint, expected=expected)  # removes what a kill left half-written, sets aside what is damaged
    runtime.barrier()
    return _last_complete(checkpoint, remove=False, expected=expected)


def _checkpoint_problem(path, expected: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """Why transformers' checkpoint folder ``path`` cannot be resumed from (None: it can).
    ``trainer_state.json`` is the last file transformers writes, but not atomically: a kill while
    it is written leaves it empty or cut short, so it must parse and name the folder's step. The
    weights' safetensors files must hold every byte their header promises and, given ``expected``
    (the model's tensor shapes), fit the model; the torch files (optimiser, scheduler, RNG states)
    must read back whole (their zip CRCs)."""
    import json
    import zipfile

    try:
        state = json.loads((path / "trainer_state.json").read_text())
        step = state["global_step"]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        return f"trainer_state.json: {type(e).__name__}: {e}"
    if str(step) != path.name.split("-")[-1]:
        return f"trainer_state.json names step {step!r}, not {path.name.split('-')[-1]}"
    weights = [p for p in path.glob("*.safetensors") if not p.name.startswith(("optimizer", "rng"))]
    if not weights and not (path / "adapter_model.safetensors").is_file():
        return "no model weights (*.safetensors)"
    shapes: dict[str, tuple[int, ...]] = {}
    for w in weights:
        try:
            shapes |= _safetensors_shapes(w)
        except (OSError, ValueError, TypeError, KeyError) as e:
            return f"{w.name}: {type(e).__name__}: {e}"
    if expected and not (path / "adapter_model.safetensors").is_file():
        missing = sorted(set(expected) - set(shapes) - {"lm_head.weight"})  # (tied to the embeddings)
        unexpected = sorted(set(shapes) - set(expected))
        other = sorted(k for k in set(shapes) & set(expected) if shapes[k] != tuple(expected[k]))
        if missing or unexpected or other:
            return (f"model weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                    f"other shape {other[:3]}")
    for f in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")):
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{f.name}: member {bad} fails its CRC"
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
            return f"{f.name}: {type(e).__name__}: {e}"
    return None


def _safetensors_shapes(path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header; ValueError when the file is cut short."""
    import json

    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000 or size < 8 + n:
            raise ValueError("truncated header")
        header = json.loads(f.read(n))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if size < 8 + n + end:
        raise ValueError(f"truncated: {size} bytes, the header promises {8 + n + end}")
    return {k: tuple(int(d) for d in v["shape"]) for k, v in tensors.items()}


def _last_complete(checkpoint, remove: bool = True, expected: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """The newest ``checkpoint-N`` that transformers finished writing and that reads back; with
    ``remove``, a folder a kill left before its last file (``trainer_state.json``) is removed and
    one whose files do not read back (cut short by a kill, or damaged since) is set aside."""
    import shutil

    from mopd.checkpoint import set_aside

    done = []
    for path in checkpoint.glob("checkpoint-*"):
        if not path.name.split("-")[-1].isdigit():
            continue
        if not (path / "trainer_state.json").is_file():
            if remove:
                shutil.rmtree(path, ignore_errors=True)
            continue
        problem = _checkpoint_problem(path, expected)
        if problem is None:
            done.append((int(path.name.split("-")[-1]), path))
        elif remove:
            set_aside(path, checkpoint, problem)
    return str(max(done)[1]) if done else None
