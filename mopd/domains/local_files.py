"""Local data files, read so that bad input is named, never followed: where a path may point and
how each format is parsed, with errors that give the file, the line or row and the cause.

Path rule (:func:`resolve_local`): a **relative** path (``data/gsm8k.jsonl``, a directory, a glob)
is resolved against the project root with every symlink followed, and each file it names must
stay inside the root: ``../x``, and a symlink inside the project to a file outside it, are
refused. An **absolute** path is the user's explicit choice and may point anywhere (symlinks
included). Formats: ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects, or JSON
Lines), ``.csv`` (header row; every cell read as text, empty cells as ""), ``.parquet``. Text
must be UTF-8. Rows are numbered from 0 in the order of the file (the CSV header and blank JSON
Lines not counted); parse errors give the file's line instead.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataFileError(ValueError):
    """A local data file cannot be used; the message names the file (and line, row, column)."""


def is_local(path: str, root: str | os.PathLike | None = None) -> bool:
    """Whether ``path`` names local files (a directory under ``root``, a file or glob of a known
    format, or anything absolute or explicitly relative) rather than a hub id."""
    return (os.path.isdir(os.path.join(root if root is not None else os.getcwd(), path))
            or os.path.splitext(path)[1].lower() in LOCAL_FORMATS
            or os.path.isabs(path) or path.startswith(("./", "../")))


def resolve_local(path: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The data files ``path`` names (a file, a directory of data files, or a glob), resolved.
    ``root``: the project directory relative paths are resolved against (default: the current
    directory). Raises :class:`DataFileError` for a path that names no data file or leaves the
    project (see the module docstring for the rule)."""
    base = Path(root if root is not None else os.getcwd()).resolve()
    explicit = os.path.isabs(path)
    full = Path(path) if explicit else base / path
    if glob.has_magic(str(full)):
        files = sorted(Path(p) for p in glob.glob(str(full), recursive=False))
        if not files:
            raise DataFileError(f"{path}: the pattern matches no file (resolved against {base})")
    elif full.is_dir():
        files = sorted(p for p in full.iterdir() if p.suffix.lower() in LOCAL_FORMATS)
        if not files:
            raise DataFileError(f"{path}: directory holds no .json/.jsonl/.parquet/.csv file")
        exts = {p.suffix.lower() for p in files}
        if len({LOCAL_FORMATS[e] for e in exts}) > 1:
            raise DataFileError(f"{path}: directory mixes formats {sorted(exts)}; keep one format "
                                "per directory")
    elif full.exists() or full.is_symlink():
        files = [full]
    else:
        raise DataFileError(f"{path}: no such file or directory (resolved against {base})")
    out = []
    for f in files:
        real = f.resolve()
        if not explicit and not real.is_relative_to(base):
            raise DataFileError(
                f"{path}: {f.name} resolves to {real}, outside the project {base} (a symlink or "
                "'..'); copy the data into the project or give an absolute path to read it there")
        if not real.is_file():
            raise DataFileError(f"{path}: {real} is not a regular file")
        if real.suffix.lower() not in LOCAL_FORMATS and f.suffix.lower() not in LOCAL_FORMATS:
            raise DataFileError(f"{path}: {f.name}: unknown format; expected "
                                ".json/.jsonl/.parquet/.csv")
        out.append(real)
    return out


def read_rows(file: Path, fmt_suffix: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of one data file; rows are dicts of Python values."""
    suffix = (fmt_suffix or file.suffix).lower()
    if suffix == ".parquet":
        return _read_parquet(file)
    if suffix == ".csv":
        return _read_csv(file)
    return _read_json(file, lines=suffix == ".jsonl")


def _read_parquet(file: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types; name the file
        raise DataFileError(f"{file}: cannot be read as parquet: {_short(exc)}") from None
    return table.column_names, table.to_pylist()


def _read_csv(file: Path):
    import pandas as pd

    try:
        df = pd.read_csv(file, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{file}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} "
                            f"at offset {exc.start}); re-encode it as UTF-8") from None
    except Exception as exc:  # noqa: BLE001 - pandas' ParserError names the line
        raise DataFileError(f"{file}: cannot be read as CSV: {_short(exc)}") from None
    return list(df.columns), df.to_dict("records")


def _read_json(file: Path, lines: bool):
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFileError(f"{file}: line {line}: not UTF-8 text (byte "
                            f"{data[exc.start:exc.start + 1]!r}); re-encode it as UTF-8") from None
    if not lines:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": several values, i.e. JSON Lines
                raise DataFileError(f"{file}: line {exc.lineno}: not valid JSON ({exc.msg}, "
                                    f"column {exc.colno})") from None
        else:
            if isinstance(value, dict):  # JSON Lines holding one line
                value = [value]
            if not isinstance(value, list):
                raise DataFileError(f"{file}: expected a list of objects (or JSON Lines), got a "
                                    f"JSON {type(value).__name__}")
            return _columns(file, value, "row", 0), value
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{file}: line {n}: not valid JSON ({exc.msg}, column "
                                f"{exc.colno})") from None
    return _columns(file, rows, "line", 1), rows


def _columns(file: Path, rows: list, unit: str, first: int) -> list[str]:
    names: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataFileError(f"{file}: {unit} {i + first}: expected a JSON object, got "
                                f"{type(row).__name__}")
        names.update(dict.fromkeys(row))
    return list(names)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip()[:300]}"
