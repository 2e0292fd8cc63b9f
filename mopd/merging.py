"""Parameter merges of same-origin checkpoints through mergekit 0.1.5 (ALGORITHMS §7).

Used by the Param-Merge baseline (MOPD §4.1: linear / task-arithmetic merge of the Stage-2 teachers),
the M2RL merge sweep (M2RL §3.2: average, TA, TIES, SCE, each optionally with DARE at mask ratio
0.8) and CoPD's final branch merge.

Semantics, with base = the SFT checkpoint, teachers t_1..t_n, task vectors d_i = t_i - base:

- ``linear``: weighted mean of the TEACHERS, ``sum_i w_i t_i / sum_i w_i`` (w_i = 1 by default).
  The base does not participate: MOPD's "Param-Merge (Avg.)" and M2RL's "Average" average the
  domain models themselves (Model Soups). ``base`` is still required: its tokenizer is copied.
- ``task_arithmetic``: ``base + lambda * sum_i w_i d_i`` (Ilharco et al.; lambda = 1, w_i = 1).
- ``ties``: trim each d_i to its top-``density`` magnitudes, elect a sign per entry, average the
  agreeing entries (mergekit ``normalize=True``), times lambda (Yadav et al. 2023). density
  defaults to 0.2, the TIES paper's top-20%.
- ``dare_ties`` / ``dare_linear``: DARE drops entries of d_i at random with p = 1 - density and
  rescales the rest (Yu et al. 2024), then TIES sign election or a plain weighted sum.
  density defaults to 0.2 (M2RL §3.2 "mask ratio 0.8"). Seeded (``params["seed"]``, default 0).
- ``sce``: select (top-``select_topk`` variance entries), calculate (per-model weights from
  squared task-vector norms), erase (minority signs) (Wan et al., FuseChat); no per-model weights.

Output: safetensors only. Inputs must be safetensors checkpoints (mergekit would otherwise
``torch.load`` a pickle), remote code is never trusted, and the mergekit config is built as
mergekit's own ``MergeConfiguration`` and written to ``<out_dir>/merge_config.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_FILE = "merge_config.yaml"
# files copied from the base (SFT) checkpoint so the merged model speaks the student's template
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# config.json keys that must agree between base and every model for a weight-space merge
SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)
DTYPES = ("float32", "bfloat16", "float16")
COMMON_PARAMS: dict[str, Any] = {"dtype": None, "seed": 0}
# method -> (mergekit method name, method-specific params with their defaults, per-model weights?)
METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "linear": ("linear", {}, True),
    "task_arithmetic": ("task_arithmetic", {"lambda": 1.0}, True),
    "ties": ("ties", {"density": 0.2, "lambda": 1.0, "normalize": True}, True),
    "dare_ties": ("dare_ties", {"density": 0.2, "lambda": 1.0, "normalize": False}, True),
    "dare_linear": ("dare_linear", {"density": 0.2, "lambda": 1.0, "normalize": False}, True),
    "sce": ("sce", {"select_topk": 1.0}, False),
}


def merge(
    method: str,
    *,
    base: Path,
    models: list[Path],
    out_dir: Path,
    weights: list[float] | None = None,
    params: dict[str, Any] | None = None,
    overwrite: bool = False,
    paths_from: Path | None = None,
) -> Path:
    """Merge ``models`` (the teachers) relative to ``base`` (the SFT checkpoint) into ``out_dir``.

    ``params`` holds method-specific settings (see :data:`METHODS`: ``lambda``, ``density``,
    ``normalize``, ``select_topk``) plus ``dtype`` (``float32``/``bfloat16``/``float16``; default:
    the inputs' dtype) and ``seed`` (DARE's random drop; default 0). Everything is validated before
    any work: an unknown method, key, out-of-range value, missing checkpoint or mismatched
    architecture raises ValueError naming it. Runs on CPU; writes safetensors, ``config.json``,
    the base's tokenizer files and ``merge_config.yaml``. Returns ``out_dir``.

    ``paths_from`` (the project folder): the written ``merge_config.yaml`` names the models under
    it by paths relative to it, so the record (and the stage's content hash) is the same wherever
    the project is copied; models elsewhere keep their absolute paths.
    """
    base, models, out_dir = Path(base), [Path(m) for m in models], Path(out_dir)
    resolved = resolve_params(method, params)
    weights = _check_weights(method, weights, len(models))
    _check_checkpoints(base, models)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {out_dir} exists and is not empty; pass overwrite=True to replace it")

    config = build_config(method, base=base, models=models, weights=weights, params=resolved)
    recorded = config if paths_from is None else build_config(
        method, base=_relative(base, paths_from), models=[_relative(m, paths_from) for m in models],
        weights=weights, params=resolved, resolve=False)
    config_yaml = (("# model paths relative to the project folder\n" if paths_from is not None else "")
                   + recorded.to_yaml() + "\n")  # before run_merge, which rewrites the config in place
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        _run(config, tmp, seed=resolved["seed"] if method.startswith("dare_") else None)
        _copy_tokenizer(base, tmp)
        (tmp / CONFIG_FILE).write_text(config_yaml)
        _check_output(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s merge of %d models into %s took %.1f s", method, len(models), out_dir, time.perf_counter() - t0)
    return out_dir


def method_params(method: str, *, task_arithmetic_lambda: float, density: float, seed: int) -> dict[str, Any]:
    """A method's settings from the params.yaml knobs the Param-Merge baselines and CoPD's final
    merge share (``lambda`` for task arithmetic, ``density`` for TIES/DARE, DARE's ``seed``)."""
    return {"linear": {}, "task_arithmetic": {"lambda": task_arithmetic_lambda}, "ties": {"density": density},
            "dare_ties": {"density": density, "seed": seed}, "dare_linear": {"density": density, "seed": seed},
            "sce": {}}[method]


def resolve_params(method: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults for ``method`` overlaid with ``params``; ValueError naming any bad key or value."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {sorted(METHODS)}")
    _, defaults, _ = METHODS[method]
    allowed = {**COMMON_PARAMS, **defaults}
    params = dict(params or {})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for merge method {method!r}; allowed: {sorted(allowed)}")
    out = {**allowed, **params}
    for key in ("density", "select_topk"):
        if key in out:
            v = out[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
                raise ValueError(f"{method}: parameter {key!r} must be a number in (0, 1], got {v!r}")
    if "lambda" in out:
        v = out["lambda"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{method}: parameter 'lambda' must be a finite number > 0, got {v!r}")
    if "normalize" in out and not isinstance(out["normalize"], bool):
        raise ValueError(f"{method}: parameter 'normalize' must be true or false, got {out['normalize']!r}")
    if out["dtype"] is not None and out["dtype"] not in DTYPES:
        raise ValueError(f"{method}: parameter 'dtype' must be one of {DTYPES} or None, got {out['dtype']!r}")
    if isinstance(out["seed"], bool) or not isinstance(out["seed"], int) or out["seed"] < 0:
        raise ValueError(f"{method}: parameter 'seed' must be an integer >= 0, got {out['seed']!r}")
    return out


def build_config(
    method: str, *, base: Path, models: list[Path], weights: list[float] | None, params: dict[str, Any],
    resolve: bool = True,
):
    """The mergekit ``MergeConfiguration`` for a merge (``params`` as from :func:`resolve_params`);
    model paths made absolute unless ``resolve`` is False (the record's relative paths)."""
    from mergekit.config import MergeConfiguration

    mk_name, defaults, _ = METHODS[method]
    per_model = []
    for i, path in enumerate(models):
        p: dict[str, Any] = {}
        if weights is not None or method != "sce":
            p["weight"] = 1.0 if weights is None else float(weights[i])
        if "density" in defaults:
            p["density"] = float(params["density"])
        per_model.append({"model": str(path.resolve() if resolve else path), "parameters": p or None})
    shared = {k: params[k] for k in defaults if k != "density"}
    if "lambda" in shared:
        shared["lambda"] = float(shared["lambda"])
    cfg: dict[str, Any] = {"merge_method": mk_name, "models": per_model, "parameters": shared or None}
    if method != "linear":  # linear averages the teachers only (see module docstring)
        cfg["base_model"] = str(base.resolve() if resolve else base)
    if params["dtype"] is not None:
        cfg["dtype"] = params["dtype"]
    return MergeConfiguration.model_validate(cfg)


def _relative(path: Path, root: Path) -> Path:
    """``path`` relative to ``root`` when it lies under it (else absolute)."""
    here, top = Path(path).resolve(), Path(root).resolve()
    return here.relative_to(top) if here.is_relative_to(top) else here


def _check_weights(method: str, weights: list[float] | None, n_models: int) -> list[float] | None:
    if weights is None:
        return None
    if not METHODS[method][2]:
        raise ValueError(f"merge method {method!r} takes no per-model weights; pass weights=None")
    weights = list(weights)
    if len(weights) != n_models:
        raise ValueError(f"weights has {len(weights)} entries but there are {n_models} models; give one per model")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights[{i}] must be a finite number, got {w!r}")
    if method == "linear" and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"linear merge weights must be >= 0 with a positive sum, got {weights}")
    return [float(w) for w in weights]


def _check_checkpoints(base: Path, models: list[Path]) -> None:
    """Every checkpoint is a local safetensors directory with the same architecture as ``base``."""
    if not models:
        raise ValueError("models is empty; give at least one checkpoint to merge")
    base_cfg = _read_checkpoint(base, "base")
    for i, m in enumerate(models):
        cfg = _read_checkpoint(m, f"models[{i}]")
        for key in SHAPE_KEYS:
            if cfg.get(key) != base_cfg.get(key):
                raise ValueError(
                    f"models[{i}] ({m}) has {key}={cfg.get(key)!r} but base ({base}) has {base_cfg.get(key)!r}; "
                    "weight-space merges need same-origin checkpoints of one architecture"
                )


def _read_checkpoint(path: Path, what: str) -> dict[str, Any]:
    if "+" in str(path):  # mergekit reads "a+b" as model a with LoRA b
        raise ValueError(f"{what} path {path} contains '+', which mergekit reads as a LoRA suffix; rename it")
    if not (path / "config.json").is_file():
        raise ValueError(f"{what} {path} is not a checkpoint directory (no config.json)")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise ValueError(
            f"{what} {path} has no model.safetensors[.index.json]; only safetensors checkpoints are merged "
            "(pickled .bin weights are never loaded)"
        )
    return json.loads((path / "config.json").read_text())


def _run(config, out: Path, *, seed: int | None) -> None:
    """mergekit on CPU. ``seed`` (DARE only) goes through ``transformers.set_seed``, which reseeds
    the process-global random/numpy/torch generators: their states are restored afterwards."""
    import random

    import numpy as np
    import torch
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(
        device="cpu",
        cuda=False,
        safe_serialization=True,  # write safetensors, never pickle
        lazy_unpickle=False,
        trust_remote_code=False,
        allow_crimes=False,
        copy_tokenizer=False,  # we copy the base's tokenizer ourselves (linear has no base in config)
        write_model_card=False,
        random_seed=seed,
        quiet=True,
    )
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        run_merge(config, str(out), options)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def _copy_tokenizer(base: Path, out: Path) -> None:
    copied = [name for name in TOKENIZER_FILES if (base / name).is_file()]
    for name in copied:
        shutil.copy2(base / name, out / name)
    if not copied:
        logger.warning("base %s has no tokenizer files; the merged model at %s has none either", base, out)


def _check_output(out: Path) -> None:
    pickles = sorted(p.name for p in out.glob("*.bin")) + sorted(p.name for p in out.glob("*.pt"))
    if pickles:
        raise RuntimeError(f"mergekit wrote pickle files {pickles} in {out}; expected safetensors only")
    if not list(out.glob("*.safetensors")):
        raise RuntimeError(f"mergekit wrote no .safetensors file in {out}")
