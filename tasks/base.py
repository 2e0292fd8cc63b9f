"""Stage `base`: the base checkpoint (tiny: built locally; pretrained: hub id or local dir)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from pathlib import Path

from mopd.artifacts import Result, finalize
from mopd.data import corpus
from mopd.models import build_base

if TYPE_CHECKING:  # the root configuration belongs to the runner (tasks.cli)
    from mopd.config import Config


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker) -> Result:
    """Build or load the profile's model and tokenizer and save them as safetensors."""
    texts = corpus(inputs["data"], cfg.domains)
    metrics = build_base(cfg.params.model_profile, texts, out_dir / "model", cfg.params.seed)
    tracker.log_metrics(metrics)
    return finalize("base", cfg.project_dir, out_dir, metrics)


if __name__ == "__main__":
    from tasks.cli import main

    raise SystemExit(main("base", run))
