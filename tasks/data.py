"""Stage `data`: each domain's train/eval records as parquet (synthetic from the seed, or real)."""

from __future__ import annotations

from mopd.artifacts import Result
from mopd.data import domain_records, write_domain
from mopd.settings.model import TinyProfile
from mopd.stage import StageContext


def run(ctx: StageContext) -> Result:
    """Write <out_dir>/<domain>/{train,eval}.parquet for every domain of the pipeline and every
    other domain one of its benchmarks reads (:attr:`Config.data_domains`)."""
    cfg, out_dir, tracker = ctx.cfg, ctx.out_dir, ctx.tracker
    metrics = {}
    limit = cfg.params.data.max_prompt_length
    count = _token_counter(cfg) if limit is not None else None
    for name in cfg.data_domains:
        records = domain_records(name, cfg.domain(name), cfg.params.data, cfg.params.seed,
                                 project_dir=cfg.project_dir, max_prompt_length=limit,
                                 count_tokens=count)
        write_domain(records, out_dir / name)
        for split, recs in records.items():
            metrics[f"{name}/{split}_records"] = len(recs)
        metrics[f"{name}/flawed_demos"] = sum(1 for r in records["train"] if r.get("flawed"))
    tracker.log_metrics(metrics)
    return ctx.result(metrics)


def _token_counter(cfg):
    """Prompt length in tokens as the model is asked it: a real profile's own tokenizer over the
    rendered prompt (chat template included); for the tiny profile, whose tokenizer is trained
    after this stage, UTF-8 bytes (its byte-level BPE never makes more tokens than bytes)."""
    profile = cfg.params.model_profile
    if not isinstance(profile, TinyProfile):
        from mopd.chat import prompt_format, render_prompt
        from mopd.models import profile_tokenizer

        tok, fmt = profile_tokenizer(profile), prompt_format(profile)
        return lambda text: len(render_prompt(tok, text, fmt))
    return lambda text: len(text.encode("utf-8"))


if __name__ == "__main__":
    from tasks.runner import main

    raise SystemExit(main("data", run))
