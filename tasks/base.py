"""Stage `base`: the base checkpoint (tiny: built locally; pretrained: hub id or local dir)."""

from __future__ import annotations

from mopd.artifacts import Result
from mopd.data import corpus
from mopd.models import build_base
from mopd.stage import StageContext


def run(ctx: StageContext) -> Result:
    """Build or load the profile's model and tokenizer and save them as safetensors."""
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    texts = corpus(ctx.role("data"), cfg.domains)
    metrics = build_base(cfg.params.model_profile, texts, out_dir / "model", cfg.params.seed)
    tracker.log_metrics(metrics)
    return ctx.result(metrics)


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("base", run))
