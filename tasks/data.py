"""Stage `data`: each domain's train/eval records as parquet (synthetic from the seed, or real)."""

from __future__ import annotations

from pathlib import Path

from mopd.artifacts import Result, finalize
from mopd.config import Config
from mopd.data import domain_records, write_domain


def run(cfg: Config, inputs: dict[str, Path], out_dir: Path, tracker) -> Result:
    """Write <out_dir>/<domain>/{train,eval}.parquet for every domain of the pipeline."""
    metrics = {}
    for name in cfg.domains:
        records = domain_records(name, cfg.domain(name), cfg.params.data, cfg.params.seed,
                                 project_dir=cfg.project_dir)
        write_domain(records, out_dir / name)
        for split, recs in records.items():
            metrics[f"{name}/{split}_records"] = len(recs)
        metrics[f"{name}/flawed_demos"] = sum(1 for r in records["train"] if r.get("flawed"))
    tracker.log_metrics(metrics)
    return finalize("data", cfg.project_dir, out_dir, metrics)


if __name__ == "__main__":
    from tasks.cli import main

    raise SystemExit(main("data", run))
