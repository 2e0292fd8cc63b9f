"""Real data into the record schema: local files (json/jsonl/parquet/csv, read and confined by
:mod:`mopd.domains.local_files`) or a hub id (through the ``datasets`` library).

``load_records(domain, source)`` reads them and maps columns to record fields; a reference column
must hold one type of value, prompts may be capped at the model's context, and every error names
the file, the row and the column. Supported layouts (column names come from ``source.columns`` or the
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mopd.domains.local_files import is_local, read_rows, resolve_local
from mopd.domains.registry import Domain, get_domain
from mopd.verifiers.ifeval import ifeval_reference

logger = logging.getLogger(__name__)

RECORD_FIELDS = ("prompt", "reference", "completion", "id", "choices", "entry_point", "setup",
                 "kwargs")


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


def load_records(domain: str, source: DataSource | Mapping[str, Any] | str, *,
                 root: str | os.PathLike | None = None, max_prompt_length: int | None = None,
                 count_tokens: Callable[[str], int] | None = None) -> list[dict]:
    """Load ``source`` as records of ``domain`` (see module docstring for layouts).

    ``root``: the project directory; local paths follow the rule of
    :mod:`mopd.domains.local_files` (relative ones resolved against it and kept inside it).
    ``max_prompt_length``: the longest prompt accepted (the model's context), in tokens as
    counted by ``count_tokens`` (e.g. ``lambda s: len(tokenizer(s).input_ids)``) or, without
    it, in characters. Every error names the file, the row and the column."""
    spec = get_domain(domain)
    src = DataSource.coerce(source)
    columns = dict(src.columns or spec.default_columns)
    bad = set(columns) - set(RECORD_FIELDS)
    if bad:
        raise ValueError(f"columns: unknown record field(s) {sorted(bad)}; known: {RECORD_FIELDS}")
    for required in ("prompt", "reference"):
        if required not in columns:
            raise ValueError(f"columns: missing mapping for required field {required!r}")
    tag = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(src.path.rstrip("/")) or src.path)
    records: list[dict] = []
    for name, names, rows in _load_parts(src, root):
        missing = sorted(c for c in set(columns.values()) if c not in names)
        if missing:
            raise ValueError(f"{name}: missing column(s) {missing}; available: {sorted(names)}")
        _check_types(name, rows, columns["reference"])
        for index, row in enumerate(rows):
            if src.limit is not None and len(records) >= src.limit:
                break
            default_id = f"{domain}-{tag}-{src.split}-{len(records):06d}"
            try:
                record = _to_record(spec, columns, row, default_id)
                _check_length(record["prompt"], max_prompt_length, count_tokens, columns["prompt"])
            except ValueError as exc:
                raise ValueError(f"{name}: row {index}, {exc}") from None
            records.append(record)
    logger.info("loaded %d %s records from %s", len(records), domain, src.path)
    return records


def _load_parts(src: DataSource, root) -> list[tuple[str, list[str], list[dict]]]:
    """(file name, column names, rows) of each local file, or of the hub dataset."""
    if is_local(src.path, root):
        return [(str(f), *read_rows(f)) for f in resolve_local(src.path, root)]
    import datasets  # heavy import, only for hub data

    try:
        table = datasets.load_dataset(src.path, src.name, split=src.split, cache_dir=src.cache_dir)
    except Exception as exc:  # noqa: BLE001 - name the dataset, keep the cause short
        raise ValueError(f"{src.path} (hub, split {src.split!r}): cannot be loaded: "
                         f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    return [(f"{src.path}[{src.split}]", list(table.column_names), list(table))]


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _check_types(name: str, rows: list[dict], column: str) -> None:
    """One kind of value per reference column (text, number, list, ...): a file where row 3
    holds "12" and row 7 holds [12] was written by two different processes, and is refused."""
    first: tuple[int, str] | None = None
    for index, row in enumerate(rows):
        kind = _kind(row.get(column))
        if kind is None:
            continue
        if first is None:
            first = (index, kind)
        elif kind != first[1]:
            raise ValueError(f"{name}: column {column!r} mixes types: row {first[0]} is "
                             f"{first[1]}, row {index} is {kind}; make every value one type")


def _check_length(prompt: str, limit: int | None, count: Callable[[str], int] | None,
                  column: str) -> None:
    if limit is None:
        return
    n, unit = (count(prompt), "tokens") if count else (len(prompt), "characters")
    if n > limit:
        raise ValueError(f"column {column!r}: the prompt is {n} {unit} long, over the limit of "
                         f"{limit} (the model's context); shorten or drop the row")


def _to_record(spec: Domain, columns: dict[str, str], row: dict, default_id: str) -> dict:
    """One row as a record; a ValueError's message starts with the column at fault."""
    question = row.get(columns["prompt"])
    if not isinstance(question, str) or not question.strip():
        what = ("empty" if question is None or isinstance(question, str)
                else f"of type {type(question).__name__}, not text")
        raise ValueError(f"column {columns['prompt']!r}: the prompt is {what}")
    ref_col = columns["reference"]
    raw_ref = row.get(ref_col)
    if raw_ref is None or (isinstance(raw_ref, (str, list)) and not raw_ref):
        raise ValueError(f"column {ref_col!r}: empty reference")
    completion = row.get(columns["completion"]) if "completion" in columns else None
    try:
        if spec.verifier == "math":
            reference = math_reference(raw_ref)
            completion = completion if completion is not None else f"\\boxed{{{reference}}}"
        elif spec.verifier == "code":
            reference = code_reference(raw_ref, row.get(columns.get("setup", "")),
                                       row.get(columns.get("entry_point", "")), question)
        elif spec.verifier == "if":
            reference = if_reference(raw_ref, row.get(columns.get("kwargs", "")))
        else:
            try:
                choices = _choice_texts(row.get(columns.get("choices", "")))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"column {columns.get('choices')!r}: {exc}") from None
            if choices is not None:
                question += " " + " ".join(f"{chr(65 + i)}){c}" for i, c in enumerate(choices))
            reference = mc_reference(raw_ref, choices)
            completion = completion if completion is not None else f"Answer: {reference}"
    except ValueError as exc:
        if str(exc).startswith("column "):
            raise
        raise ValueError(f"column {ref_col!r}: {exc}") from None
    record_id = default_id
    if "id" in columns:
        if row.get(columns["id"]) in (None, ""):
            raise ValueError(f"column {columns['id']!r}: empty id")
        record_id = str(row[columns["id"]])
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
