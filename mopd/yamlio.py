"""Reading a user's YAML file defensively: a size cap, UTF-8 with the file named on failure,
duplicate keys refused (PyYAML silently keeps the last one), and alias expansion bounded (a
"billion laughs" file of a few hundred bytes otherwise expands to gigabytes). Safe loader only:
no Python objects are ever constructed from the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a configuration file is a few KB; 1 MiB is generous
MAX_NODES = 100_000  # YAML nodes after alias expansion
MAX_DEPTH = 64  # lists/mappings inside each other; a configuration is a few levels deep


class YamlError(ValueError):
    """The file cannot be read as a configuration; the message names the file and where."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""

    path = "<yaml>"
    _depth = 0

    def compose_node(self, parent, index):
        # why: PyYAML composes recursively; a 3,000-deep "[[[...]]]" otherwise runs into Python's
        # recursion limit slowly (seconds) before failing. Stop at MAX_DEPTH, naming the line.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlError(f"{self.path}: line {mark.line + 1}: nested more than {MAX_DEPTH} "
                                f"levels deep (lists or mappings inside each other); a configuration "
                                f"is a few levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    raise YamlError(f"{self.path}: line {key_node.start_mark.line + 1}: a mapping key "
                                    f"must be a scalar, not {type(key).__name__}") from None
                if key in seen:
                    raise YamlError(
                        f"{self.path}: line {key_node.start_mark.line + 1}: duplicate key {_short(key)} "
                        f"(first at line {seen[key] + 1}; YAML would silently keep the last value: "
                        f"remove one of them)")
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _expanded_size(root: yaml.Node) -> int:
    """Node count with every alias expanded, computed without expanding (memo per node);
    stops counting past MAX_NODES."""
    memo: dict[int, int] = {}
    visiting: set[int] = set()  # nodes on the current path (iterative DFS)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = ([v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            memo[id(node)] = min(MAX_NODES + 1, 1 + sum(memo[id(c)] for c in children))
            visiting.discard(id(node))
            continue
        if id(node) in memo:
            continue
        if id(node) in visiting:
            raise YamlError("recursive alias")
        visiting.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in memo)
    return memo[id(root)]


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of ``path``; :class:`YamlError` naming the file otherwise."""
    if not path.is_file():
        raise YamlError(f"{path}: file not found")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise YamlError(f"{path}: {size} bytes; a configuration file may have at most {MAX_BYTES}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise YamlError(f"{path}: line {line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start}); save the file as UTF-8") from None
    loader = _Loader(text)
    loader.path = str(path)
    try:
        node = loader.get_single_node()
        if node is None:
            data = None
        else:
            try:
                size = _expanded_size(node)
            except YamlError:
                raise YamlError(f"{path}: an alias refers to a node that contains it (recursive "
                                f"alias); write the value out instead") from None
            if size > MAX_NODES:
                raise YamlError(f"{path}: its aliases expand to more than {MAX_NODES} values (an "
                                f"alias bomb?); write the values out or use fewer aliases")
            data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        from mopd.security import redact_text

        raise YamlError(f"{path}: not valid YAML: {redact_text(str(exc))[:600]}") from None
    except RecursionError:
        raise YamlError(f"{path}: nested too deeply (lists or mappings inside each other hundreds of "
                        f"levels deep); a configuration is a few levels deep") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise YamlError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    try:
        _dvc_can_read(path, text)
    except RecursionError:
        raise YamlError(f"{path}: nested too deeply for DVC's YAML reader; a configuration is a few "
                        f"levels deep") from None
    return data


def _dvc_can_read(path: Path, text: str) -> None:
    """DVC reads params.yaml / pipelines.yaml with ruamel, which is stricter than PyYAML in places
    (``[a, b:c]``: a ':' inside a flow list); a file DVC cannot read would break `dvc repro` and
    the lock sync later, so it is refused now. Runs after the checks above (size, aliases)."""
    try:
        from ruamel.yaml import YAML
        from ruamel.yaml.error import YAMLError as RuamelError
    except ImportError:  # DVC (and ruamel) not installed: nothing to agree with
        return
    try:
        YAML(typ="safe").load(text)  # as dvc.utils.serialize.parse_yaml reads params
    except RuamelError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YamlError(f"{path}: {where}DVC's YAML reader cannot read this file ({problem}); quote "
                        "the value (e.g. \"distill:tropd\" inside [...])") from None
