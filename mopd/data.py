"""The data stage's library half: records per domain, written to parquet, read back by stages.

Layout: ``<data_dir>/<domain>/train.parquet`` and ``eval.parquet`` with the record schema of
:mod:`mopd.domains` (id, domain, prompt, completion, reference). Synthetic domains are generated
from the seed (evaluation from a separate seed stream; `eval_disjoint` excludes training prompts); ``hub`` and ``local`` sources go through
``datasets`` by the same code (:func:`mopd.domains.loaders.load_records`); ``humaneval`` and
``reasoning_gym`` come from the packages that ship them (:mod:`mopd.domains.sources`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from mopd.settings.data import DataParams, DomainConfig, HubSource, LocalSource

log = logging.getLogger(__name__)

# The splits this process read (path -> (domain, split)): the stage runner logs them as the MLflow
# run's dataset inputs (training or evaluation), so the UI's "Datasets used" names what each
# stage trained and was scored on.
_READ: dict[Path, tuple[str, str]] = {}


def datasets_read() -> list[tuple[Path, str, str]]:
    """``(file, domain, split)`` of every split read in this process, in the order first read."""
    return [(path, domain, split) for path, (domain, split) in _READ.items()]

SPLITS = ("train", "eval")
EVAL_SEED_OFFSET = 1_000_003  # evaluation prompts come from a different random stream


def domain_records(name: str, dom: DomainConfig, params: DataParams, seed: int, *,
                   project_dir: Path | None = None, max_prompt_length: int | None = None,
                   count_tokens=None) -> dict[str, list[dict]]:
    """Train and eval records of one domain. Local data paths are resolved against
    ``project_dir`` (default: the current directory) and must stay inside it unless absolute;
    ``max_prompt_length`` / ``count_tokens``: see :func:`mopd.domains.loaders.load_records`."""
    from mopd.domains import generate
    from mopd.domains.loaders import load_records

    src = dom.data
    if src.source == "synthetic":
        kind = name if name in ("math", "code", "if", "mc") else dom.verifier
        train = generate(kind, params.n_train, seed, flawed=params.flawed_demos)
        exclude = {r["prompt"] for r in train} if params.eval_disjoint else ()
        evals = generate(kind, params.n_eval, seed + EVAL_SEED_OFFSET, exclude_prompts=exclude)
    elif src.source in ("humaneval", "reasoning_gym"):  # benchmarks shipped by packages
        from mopd.domains.sources import package_records

        train, evals = package_records(dom.verifier, src, params.n_eval,
                                       eval_seed_offset=EVAL_SEED_OFFSET)
    else:
        path = src.id if isinstance(src, HubSource) else src.path
        common = {"columns": dict(src.columns)}
        checks = {"root": project_dir, "max_prompt_length": max_prompt_length,
                  "count_tokens": count_tokens}
        if isinstance(src, HubSource):
            common["name"] = src.name
        train = load_records(dom.verifier, {"path": path, "split": getattr(src, "split", "train"),
                                            "limit": params.n_train, **common}, **checks)
        eval_path = src.eval_path if isinstance(src, LocalSource) else path
        eval_split = src.eval_split if isinstance(src, HubSource) else "train"
        if isinstance(src, LocalSource) and src.eval_path is None:
            # One local file: hold out its last n_eval rows (documented in README).
            train, evals = train[: -params.n_eval], train[-params.n_eval:]
        else:
            evals = load_records(dom.verifier, {"path": eval_path, "split": eval_split or "test",
                                                "limit": params.n_eval, **common}, **checks)
    for rec in train + evals:
        rec["domain"] = name
    if not train or not evals:
        raise ValueError(f"domain {name!r}: empty train ({len(train)}) or eval ({len(evals)}) split")
    return {"train": train, "eval": evals}


_COLUMNS = ["id", "domain", "prompt", "completion", "reference"]


def write_domain(records: dict[str, list[dict]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, recs in records.items():
        df = pd.DataFrame([{c: str(r.get(c, "") or "") for c in _COLUMNS} for r in recs])
        df.to_parquet(out_dir / f"{split}.parquet", index=False)


def read_split(data_dir: Path, domain: str, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    path = data_dir / domain / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {split} data for domain {domain!r}")
    _READ.setdefault(path, (domain, split))
    return pd.read_parquet(path).to_dict("records")


def corpus(data_dir: Path, domains: list[str]) -> list[str]:
    """All training text, prompts and gold completions as separate texts: what the tiny tokenizer
    is trained on (apart, so that no merge spans the prompt/completion boundary, which the model
    never sees joined: :func:`mopd.trainers.sft.tokenize_pairs`)."""
    return [text for d in domains for r in read_split(data_dir, d, "train")
            for text in (r["prompt"], r["completion"])]


BALANCED_FILE = "balanced.parquet"


def read_balanced(difficulty_dir: Path, domain: str) -> list[dict]:
    """The difficulty stage's balanced (upsampled) training prompts of ``domain``."""
    path = difficulty_dir / domain / BALANCED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no balanced prompt set for domain {domain!r}")
    _READ.setdefault(path, (domain, "balanced"))
    return pd.read_parquet(path).to_dict("records")
