"""Real data into the record schema, through the ``datasets`` library.

``load_records(domain, source)`` reads a hub id or local files (json/jsonl/parquet/csv) and maps
columns to record fields. Supported layouts (column names come from ``source.columns`` or the
domain's defaults):

- math: GSM8K (``answer`` ends with ``#### 72``) or MATH (``solution`` holds ``\\boxed{..}``),
  or a bare final answer;
- code: MBPP (``test_list``: list of asserts, optional ``setup`` column) or HumanEval (``test``
  defines ``check(candidate)``; map ``entry_point`` so ``check(<entry_point>)`` is appended, and
  the prompt's helper functions are put in front of the tests);
- if: IFEval (``instruction_id_list`` + ``kwargs``) or a column that already holds the `if`
  verifier's JSON reference;
- mc: a question, a ``choices`` list, and the answer as a letter, an index or the choice text.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mopd.domains.registry import Domain, get_domain
from mopd.verifiers.ifeval import ifeval_reference

logger = logging.getLogger(__name__)

RECORD_FIELDS = ("prompt", "reference", "completion", "id", "choices", "entry_point", "setup",
                 "kwargs")
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class DataSource:
    """Where real data lives and how its columns map onto record fields.

    ``path``: a hub id (``"openai/gsm8k"``) or local file(s) (a path, a glob, or a directory of
    .json/.jsonl/.parquet/.csv). ``columns``: record field -> column name; ``prompt`` and
    ``reference`` are required, ``completion``, ``id``, ``choices`` (mc), ``entry_point`` and
    ``setup`` (code), ``kwargs`` (if) optional. Empty = the domain's defaults.
    ``cache_dir``: where ``datasets`` keeps its Arrow cache (default: its own, under ~/.cache).
    """

    path: str
    columns: Mapping[str, str] = field(default_factory=dict)
    split: str = "train"
    name: str | None = None
    limit: int | None = None
    cache_dir: str | None = None

    @classmethod
    def coerce(cls, source: DataSource | Mapping[str, Any] | str) -> DataSource:
        if isinstance(source, DataSource):
            return source
        if isinstance(source, str):
            return cls(path=source)
        if isinstance(source, Mapping):
            unknown = set(source) - {"path", "columns", "split", "name", "limit",
                                     "cache_dir"}
            if unknown:
                raise ValueError(f"data source: unknown key(s) {sorted(unknown)}")
            return cls(**source)
        raise ValueError(f"data source must be a DataSource, dict or path, got {type(source)}")


def load_records(domain: str, source: DataSource | Mapping[str, Any] | str) -> list[dict]:
    """Load ``source`` as records of ``domain`` (see module docstring for layouts)."""
    spec = get_domain(domain)
    src = DataSource.coerce(source)
    columns = dict(src.columns or spec.default_columns)
    bad = set(columns) - set(RECORD_FIELDS)
    if bad:
        raise ValueError(f"columns: unknown record field(s) {sorted(bad)}; known: {RECORD_FIELDS}")
    for required in ("prompt", "reference"):
        if required not in columns:
            raise ValueError(f"columns: missing mapping for required field {required!r}")
    table = _load_table(src)
    missing = sorted(c for c in columns.values() if c not in table.column_names)
    if missing:
        raise ValueError(
            f"{src.path}: missing column(s) {missing}; available: {sorted(table.column_names)}"
        )
    tag = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(src.path.rstrip("/")) or src.path)
    records = []
    for index, row in enumerate(table):
        if src.limit is not None and index >= src.limit:
            break
        records.append(_to_record(spec, columns, row, f"{domain}-{tag}-{src.split}-{index:06d}"))
    logger.info("loaded %d %s records from %s", len(records), domain, src.path)
    return records


def _load_table(src: DataSource):
    import datasets  # heavy import, only when real data is loaded

    ext = os.path.splitext(src.path)[1].lower()
    if os.path.isdir(src.path):
        files = sorted(f for f in os.listdir(src.path) if os.path.splitext(f)[1] in _LOCAL_FORMATS)
        if not files:
            raise ValueError(f"{src.path}: directory holds no .json/.jsonl/.parquet/.csv file")
        ext = os.path.splitext(files[0])[1]
        data_files = [os.path.join(src.path, f) for f in files if f.endswith(ext)]
        return datasets.load_dataset(_LOCAL_FORMATS[ext], data_files=data_files, split="train",
                                     cache_dir=src.cache_dir)
    if ext in _LOCAL_FORMATS:
        return datasets.load_dataset(_LOCAL_FORMATS[ext], data_files=src.path, split="train",
                                     cache_dir=src.cache_dir)
    return datasets.load_dataset(src.path, src.name, split=src.split, cache_dir=src.cache_dir)


def _to_record(spec: Domain, columns: dict[str, str], row: dict, default_id: str) -> dict:
    question = str(row[columns["prompt"]])
    raw_ref = row[columns["reference"]]
    if raw_ref is None or (isinstance(raw_ref, (str, list)) and not raw_ref):
        raise ValueError(f"{default_id}: empty reference in column {columns['reference']!r}")
    completion = row[columns["completion"]] if "completion" in columns else None
    if spec.verifier == "math":
        reference = math_reference(raw_ref)
        completion = completion if completion is not None else f"\\boxed{{{reference}}}"
    elif spec.verifier == "code":
        reference = code_reference(raw_ref, row.get(columns.get("setup", "")),
                                   row.get(columns.get("entry_point", "")), question)
    elif spec.verifier == "if":
        reference = if_reference(raw_ref, row.get(columns.get("kwargs", "")))
    else:
        choices = _choice_texts(row.get(columns.get("choices", "")))
        if choices is not None:
            question += " " + " ".join(f"{chr(65 + i)}){c}" for i, c in enumerate(choices))
        reference = mc_reference(raw_ref, choices)
        completion = completion if completion is not None else f"Answer: {reference}"
    record_id = str(row[columns["id"]]) if "id" in columns else default_id
    return {"id": record_id, "domain": spec.name, "prompt": spec.format_prompt(question),
            "completion": "" if completion is None else str(completion), "reference": reference}


def _choice_texts(choices: Any) -> list[str] | None:
    """Choice texts from a list, or from ARC's ``{"text": [...], "label": [...]}``."""
    if choices is None:
        return None
    if isinstance(choices, Mapping):
        if "text" not in choices:
            raise ValueError(f"mc choices mapping needs a 'text' list, got keys {sorted(choices)}")
        choices = choices["text"]
    return [str(c) for c in choices]


def math_reference(raw: Any) -> str:
    """Final answer from a GSM8K answer (``#### x``), a MATH solution (last ``\\boxed``) or bare."""
    text = str(raw)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    from mopd.verifiers.math_answer import last_boxed

    boxed = last_boxed(text)
    return boxed.strip() if boxed is not None else text.strip()


def code_reference(raw: Any, setup: Any = None, entry_point: Any = None,
                   prompt: str | None = None) -> str:
    """Test code: MBPP test lists joined; HumanEval's ``check`` called on the entry point, after
    the prompt's helpers (so the tests use their own ``poly``, not the response's)."""
    tests = "\n".join(map(str, raw)) if isinstance(raw, (list, tuple)) else str(raw)
    if setup:
        tests = f"{setup}\n{tests}"
    if entry_point and "def check(" in tests:
        from mopd.domains.humaneval import humaneval_reference

        return humaneval_reference(prompt or "", tests, str(entry_point))
    return tests


def if_reference(raw: Any, kwargs: Any = None) -> str:
    """The `if` verifier's JSON reference, from IFEval ids + kwargs or an existing reference."""
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"if reference is neither an IFEval id list nor JSON: "
                             f"{raw[:80]!r}") from exc
        if isinstance(parsed, Mapping) and "instruction_id_list" in parsed:
            return json.dumps(parsed)
        raw = parsed
    if not isinstance(raw, (list, tuple)) or not all(isinstance(i, str) for i in raw):
        raise ValueError(f"if reference must be a list of IFEval instruction ids, got {raw!r:.80}")
    kwargs_list = list(kwargs) if kwargs is not None else [{}] * len(raw)
    if len(kwargs_list) != len(raw):
        raise ValueError(f"if: {len(raw)} instruction ids but {len(kwargs_list)} kwargs entries")
    kwargs_list = [json.loads(k) if isinstance(k, str) else (k or {}) for k in kwargs_list]
    return ifeval_reference([str(i) for i in raw], kwargs_list)


def mc_reference(raw: Any, choices: Any = None) -> str:
    """The answer letter, from a letter, a 0-based index or the text of one of the choices."""
    if isinstance(raw, bool):
        raise ValueError(f"mc answer must be a letter, index or choice text, got {raw!r}")
    if isinstance(raw, int):
        return chr(65 + raw)
    text = str(raw).strip()
    if len(text) == 1 and text.upper().isalpha():
        return text.upper()
    if text.isdigit():
        return chr(65 + int(text))
    if choices is not None and text in [str(c) for c in choices]:
        return chr(65 + [str(c) for c in choices].index(text))
    raise ValueError(f"mc answer {text[:40]!r} is neither a letter, an index nor a choice")
