"""Settings changed at trigger time, without editing a file: ``mopd run/plan/stage --set
distill.learning_rate=1e-4`` and the deployments' ``params`` parameter
(``prefect deployment run mopd/full -p params='{"distill": {"learning_rate": 1e-4}}'``).

An override is a dotted key of ``params.yaml`` and a value. It is applied to the file's mapping
*before* validation, so it is checked exactly like the file (an unknown key is an error naming
it); the validated sections then enter every stage's cache key, ``stage_config.json`` and MLflow
params as usual, and each stage process receives the same overrides on its command line
(``--set key=<json>``), so the flow, ``mopd run`` and a data-parallel launch agree.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-:]+)*$")
MAX_OVERRIDES = 200
MAX_DEPTH = 16
MAX_VALUE_CHARS = 100_000


class OverrideError(ValueError):
    """An override that cannot be applied; the message names it."""


def parse_value(text: str) -> Any:
    """A command-line value: JSON first (so ``1e-4`` is a number, ``[1, 2]`` a list, ``null``
    None), else YAML's safe scalar rules (``true``, plain words), else the text itself."""
    if len(text) > MAX_VALUE_CHARS:
        raise OverrideError(f"a --set value of {len(text):,} characters: at most {MAX_VALUE_CHARS:,}")
    try:
        return json.loads(text)
    except ValueError:
        pass
    except RecursionError:
        raise OverrideError("a --set value nested too deeply") from None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    except RecursionError:
        raise OverrideError("a --set value nested too deeply") from None
    return text if value is None and text.strip() not in ("", "~", "null") else value


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; a malformed item is an OverrideError."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not KEY.match(key):
            raise OverrideError(f"--set {item!r}: expected KEY=VALUE with a dotted key of params.yaml "
                                f"(e.g. distill.learning_rate=1e-4)")
        if key in out:
            raise OverrideError(f"--set {key}: given twice")
        out[key] = parse_value(value)
    return check(out)


def flatten(nested: Mapping[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """A nested mapping (the deployments' ``params``) as dotted keys; lists are values."""
    if depth > MAX_DEPTH:
        raise OverrideError(f"params: nested deeper than {MAX_DEPTH} levels at {prefix}")
    if not isinstance(nested, Mapping):
        raise OverrideError(f"params: expected a mapping of params.yaml keys, got {type(nested).__name__}")
    out: dict[str, Any] = {}
    for k, v in nested.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out |= flatten(v, key, depth + 1)
        else:
            out[key] = v
    return check(out)


def check(overrides: Mapping[str, Any]) -> dict[str, Any]:
    if len(overrides) > MAX_OVERRIDES:
        raise OverrideError(f"{len(overrides)} overrides: at most {MAX_OVERRIDES}")
    for key in overrides:
        if not isinstance(key, str) or not KEY.match(key):
            raise OverrideError(f"override {key!r}: not a dotted key of params.yaml")
    try:
        json.dumps(dict(overrides), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise OverrideError(f"overrides must be plain JSON values: {exc}") from None
    except RecursionError:
        raise OverrideError("an override's value is nested too deeply") from None
    return dict(overrides)


def apply(raw: Mapping[str, Any], overrides: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A copy of the file's mapping ``raw`` with each dotted key set (missing levels created, so
    a key the file leaves at its default can be set). ``source`` names the file in errors."""
    out = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        node: Any = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise OverrideError(f"{source}: --set {key}: {'.'.join(parts[:i + 1])} is a "
                                    f"{type(nxt).__name__}, not a section")
            node = nxt
        node[parts[-1]] = copy.deepcopy(value)
    return out


def to_args(overrides: Mapping[str, Any]) -> list[str]:
    """The stage command line's ``--set key=<json>`` arguments (JSON keeps types exact)."""
    return [a for k, v in sorted(overrides.items()) for a in ("--set", f"{k}={json.dumps(v)}")]


def overridden(key: str, overrides: Iterable[str]) -> str | None:
    """The override that set config key ``key`` (itself, or a section above it), if any."""
    for o in overrides:
        if key == o or key.startswith(o + "."):
            return o
    return None
