"""Model snapshots during training (the budget curve's points, ALGORITHMS §9): the model every
`snapshot_every` steps, staged beside the stage's in-stage checkpoint while it runs and moved into
``<stage>/snapshots/step-N`` when it ends. Shared by the on-policy loop (mopd.opd.loop) and the TRL
trainers (mopd.trainers.callbacks), so neither imports the other."""

from __future__ import annotations

from pathlib import Path

SNAPSHOTS = "snapshots"  # out_dir/snapshots/step-NNNNNN: the model every `snapshot_every` steps


def snapshot_dir(root: Path, step: int) -> Path:
    return root / SNAPSHOTS / f"step-{step:06d}"


def snapshot_staging(checkpoint: Path | None, out_dir: Path) -> Path:
    """Where a run writes its snapshots until it finishes: beside its in-stage checkpoint when it has
    one (they survive a kill there: the stage's output folder is emptied when it starts again, and
    the checkpoint folder is replaced at each save), else the output folder itself."""
    return out_dir if checkpoint is None else checkpoint.parent / f"{checkpoint.name}.snapshots"


def keep_snapshots(staging: Path, out_dir: Path) -> None:
    """Copy the staged snapshots into ``out_dir/snapshots``. The staging folder stays, with the
    in-stage checkpoint, until the stage's record is written (:func:`drop_staged`): a kill before
    that resumes from the checkpoint and still has every snapshot."""
    import shutil

    if staging == out_dir:
        return
    src = staging / SNAPSHOTS
    if src.is_dir():
        dst = out_dir / SNAPSHOTS
        dst.mkdir(parents=True, exist_ok=True)
        for d in sorted(src.iterdir()):
            shutil.rmtree(dst / d.name, ignore_errors=True)
            shutil.copytree(d, dst / d.name)


def drop_staged(checkpoint: Path) -> None:
    """A finished stage's in-stage checkpoint and staged snapshots, removed once its record is
    written (tasks.runner), never before: a kill between its last weights and its record resumes
    from the last checkpoint, not from step 0."""
    import shutil

    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.rmtree(snapshot_staging(checkpoint, checkpoint), ignore_errors=True)
