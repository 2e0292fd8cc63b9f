"""Checkpoints inside a stage: what a training loop needs to continue after a kill exactly as if it
had not stopped (model, optimiser, every RNG stream, step, metric history), tied to the stage's
cache key so that a changed configuration, teacher set (upstream content) or code never resumes
from a stale state.

Layout of ``<dir>``: ``model/`` (safetensors + config + tokenizer), ``optimizer.safetensors``
(every tensor of the optimiser state), ``rng.safetensors`` (torch's CPU generator state) and
``state.json`` (step, key, optimiser scalars and param groups, Python ``random`` state, history).
No pickle anywhere. A checkpoint is written to a temporary sibling and renamed into place, so a
kill while saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"  # sha256 of every other file, written last
ROOT = Path(".mopd") / "checkpoints"


class CheckpointMismatch(RuntimeError):
    """A checkpoint exists for this stage but was made under another cache key."""


def set_aside(path: Path, stage_dir: Path, why: str) -> Path:
    """Move a damaged checkpoint ``path`` (of the stage whose checkpoints live in ``stage_dir``)
    to ``<stage_dir>.damaged/<name>-<time>``, outside the folder a finished stage removes, and say
    so: the stage then starts from the previous checkpoint (or afresh) instead of failing on it
    at every rerun. Returns where it went."""
    import time

    path, stage_dir = Path(path), Path(stage_dir)
    dest = stage_dir.parent / f"{stage_dir.name}.damaged" / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.rsplit('~', 1)[0]}~{n}")
    path.rename(dest)
    msg = f"checkpoint {path} is damaged ({why}): set aside as {dest}; not resuming from it"
    log.warning(msg)
    print(f"warning: {msg}", flush=True)
    return dest


def checkpoint_dir(project: Path, stage: str, root: str | Path | None = None) -> Path:
    """Stage ``stage``'s in-stage checkpoints: under ``root`` (`storage.checkpoints`; relative to
    the project, or absolute: shared storage, so a stage rerun on another node resumes)."""
    return Path(project) / (root or ROOT) / stage.replace(":", "__")


@dataclass
class Resumed:
    step: int
    history: dict[str, list[tuple[int, float]]]


def save(path: Path, *, key: str, step: int, model, tokenizer, optim, py_rng: random.Random,
         history: dict[str, list[tuple[int, float]]]) -> None:
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(tmp, key=key, step=step, model=model, tokenizer=tokenizer, optim=optim, py_rng=py_rng,
               history=history)
    except BaseException:  # a full disk, a kill signal turned exception: no partial folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# why: mirrors save()'s arguments (every part of the training state is written)
def _write(tmp: Path, *, key: str, step: int, model, tokenizer, optim, py_rng: random.Random,
           history: dict[str, list[tuple[int, float]]]) -> None:
    import torch
    from safetensors.torch import save_file

    from mopd.models import save_checkpoint

    save_checkpoint(model, tokenizer, tmp / "model")
    tensors, scalars = {}, {}
    for idx, st in optim.state_dict()["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    version, internal, gauss = py_rng.getstate()
    state = {"key": key, "step": step, "param_groups": optim.state_dict()["param_groups"],
             "optimizer_scalars": scalars, "python_random": [version, list(internal), gauss],
             "history": {k: [list(p) for p in v] for k, v in history.items()}}
    (tmp / STATE_FILE).write_text(json.dumps(state))
    _write_manifest(tmp)  # last: a folder with a manifest that matches is a complete checkpoint


def _write_manifest(folder: Path) -> None:
    from mopd.artifacts import hash_tree

    (folder / MANIFEST_FILE).write_text(json.dumps(hash_tree(folder, skip=MANIFEST_FILE), indent=1, sort_keys=True))


def manifest_problem(folder: Path) -> str | None:
    """Why ``folder``'s files do not match its manifest (None when they do)."""
    from mopd.artifacts import hash_tree

    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (an older checkpoint format, or a write that did not finish)"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{MANIFEST_FILE} unreadable: {e}"
    if not isinstance(manifest, dict):
        return f"{MANIFEST_FILE} is not a mapping"
    files = hash_tree(folder, skip=MANIFEST_FILE)
    if set(files) != set(manifest):
        return (f"files differ from {MANIFEST_FILE}: missing {sorted(set(manifest) - set(files))[:3]}, "
                f"unlisted {sorted(set(files) - set(manifest))[:3]}")
    changed = [rel for rel, digest in files.items() if digest != manifest[rel]]
    if changed:
        return f"{changed[0]} does not match its sha256 in {MANIFEST_FILE} (truncated or overwritten)"
    return None


def clear_debris(path: Path) -> None:
    """Leftovers of a save that was interrupted (``.<name>.partial-PID``: an unfinished write, removed;
    ``.<name>.old-PID``: the previous checkpoint, moved back when a kill came between the two renames
    and no checkpoint is in place). Only one run of a stage at a time (mopd.stagelock), so anything
    here is an earlier run's."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for p in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not path.exists() and (p / STATE_FILE).is_file():
            log.warning("checkpoint %s: restored from %s (a save was interrupted between its renames)", path, p)
            p.rename(path)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in sorted(path.parent.glob(f".{path.name}.partial-*")):
        log.warning("removing %s: an interrupted checkpoint write", p)
        shutil.rmtree(p, ignore_errors=True)


def load(path: Path, *, key: str, model, optim, py_rng: random.Random) -> Resumed | None:
    """Restore ``model``, ``optim``, torch's and ``py_rng``'s states from ``path`` (None when there
    is no checkpoint). Raises CheckpointMismatch when it was made under another cache key."""
    path = Path(path)
    clear_debris(path)
    if not path.exists():
        return None
    problem = manifest_problem(path)
    if problem is not None:
        set_aside(path, path, problem)
        return None
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError(f"{STATE_FILE} has no integer 'step'")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        set_aside(path, path, f"{STATE_FILE}: {e}")
        return None
    if state.get("key") != key:
        raise CheckpointMismatch(
            f"{path}: a checkpoint of this stage at step {state.get('step')} was made with cache key "
            f"{str(state.get('key'))[:12]}, but the stage now has key {key[:12]} (its configuration, teacher "
            f"set / upstream outputs or code changed since): it will not resume from it. Delete {path} "
            f"to start the stage afresh.")
    try:  # every file is read before anything is restored: a damaged one changes nothing
        weights = load_file(str(path / "model" / "model.safetensors"))
        tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))["torch_cpu"]
        version, internal, gauss = state["python_random"]
        history = {k: [(int(s), float(v)) for s, v in pts] for k, pts in state["history"].items()}
        scalars, groups = dict(state["optimizer_scalars"]), list(state["param_groups"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # truncated, garbage, older format
        set_aside(path, path, f"{type(e).__name__}: {e}")
        return None
    # weights that do not fit the model (another shape, missing or extra tensors) under this same
    # cache key are damaged too: checked before anything is loaded
    own = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing, unexpected = sorted(set(own) - set(weights) - tied), sorted(set(weights) - set(own))
    shapes = [k for k in set(own) & set(weights) if tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or unexpected or shapes:
        set_aside(path, path, f"model weights do not fit the model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, other shape {sorted(shapes)[:3]}")
        return None
    model.load_state_dict(weights, strict=False)
    per: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        idx, name = k.split(".", 1)
        per.setdefault(int(idx), {})[name] = v
    for k, v in scalars.items():
        idx, name = k.split(".", 1)
        per.setdefault(int(idx), {})[name] = v
    optim.load_state_dict({"state": per, "param_groups": groups})
    torch.set_rng_state(rng)
    py_rng.setstate((version, tuple(internal), gauss))
    return Resumed(int(state["step"]), history)


def remove(path: Path) -> None:
    """A finished stage's checkpoint is removed (disk)."""
    shutil.rmtree(path, ignore_errors=True)
