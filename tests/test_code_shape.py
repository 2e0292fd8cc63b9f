"""Code shape (#23): no import cycle inside ``mopd/``, and no function there over 60 lines or 8
parameters without a ``# why: <reason>`` comment saying why.

Both checks read the sources statically (``ast``); nothing under ``mopd/`` is imported.

Import graph: an edge per explicit import between project modules. ``import a.b`` -> ``a.b``;
``from a.b import c`` -> ``a.b.c`` when that is a module (or subpackage), else the submodule the
package's ``__mopd_lazy__`` table names for ``c``, else ``a.b`` (its ``__init__``). Function-level
imports and imports marked ``# codedeps: ignore`` count (a hidden cycle is still a cycle); only
imports under ``if TYPE_CHECKING:`` are skipped. No implicit edge to parent packages' ``__init__``
(a submodule importing a sibling is not a cycle with the package).

Function shape: lines are ``end_lineno - lineno + 1`` of the ``def`` (decorators excluded);
parameters are positional-only, positional, keyword-only, ``*args`` and ``**kwargs``, less a
leading ``self`` / ``cls``. A justification is a comment line ``# why: <reason>`` in the comment
block directly above the ``def`` (above its decorators) or as the first line of the body.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

from mopd.codedeps import _resolve_lazy, module_file

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mopd"
MAX_LINES = 60
MAX_PARAMS = 8
WHY = re.compile(r"^# why: \S")


# --------------------------------------------------------------------------- import cycles


def _module_name(path: Path, root: Path) -> tuple[str, str]:
    """``<root>/mopd/a/b.py`` -> (``mopd.a.b``, package ``mopd.a``); a package ``__init__`` is
    its own package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _is_type_checking(node: ast.If) -> bool:
    return ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imports(node: ast.AST, package: str) -> list[tuple[str, list[str]]]:
    """``(module, [names imported from it])`` for every import under ``node``, however deep,
    except the bodies of ``if TYPE_CHECKING:`` (their ``else`` still runs)."""
    out: list[tuple[str, list[str]]] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for sub in child.orelse:
                out.extend(_imports(sub, package))
            continue
        if isinstance(child, ast.Import):
            out.extend((a.name, []) for a in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:  # relative: resolve against the importing module's package
                parts = package.split(".")
                parts = parts[: len(parts) - child.level + 1]
                mod = ".".join(parts + ([child.module] if child.module else []))
            else:
                mod = child.module or ""
            out.append((mod, [a.name for a in child.names if a.name != "*"]))
        out.extend(_imports(child, package))
    return out


def _targets(module: str, names: list[str], root: Path) -> set[str]:
    """The project modules one import statement names (see the module docstring)."""
    if module.split(".")[0] != PACKAGE:
        return set()
    if not names:
        return {module} if module_file(module, root) else set()
    out = set()
    for name in names:
        full = f"{module}.{name}"
        if module_file(full, root) is not None:
            out.add(full)
        elif lazy := _resolve_lazy(full, root):
            out.add(lazy)
        elif module_file(module, root) is not None:
            out.add(module)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: {project modules it imports}}`` for every ``.py`` under ``<root>/mopd``."""
    graph: dict[str, set[str]] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        name, package = _module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = graph.setdefault(name, set())
        for module, names in _imports(tree, package):
            edges |= _targets(module, names, root)
    return graph


def find_cycles(graph: dict[str, set[str]], limit: int = 200) -> list[list[str]]:
    """Every elementary cycle, each as ``[a, b, ..., a]`` starting at its smallest module (so
    each is listed once); at most ``limit`` of them."""
    cycles: list[list[str]] = []
    for start in sorted(graph):
        # cycles whose smallest node is `start`: walk only nodes >= start
        stack = [(start, [start])]
        while stack and len(cycles) < limit:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ()), reverse=True):
                if nxt == start:
                    cycles.append(path + [start])
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return sorted(cycles)


def test_import_graph_checker_finds_a_planted_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text('__mopd_lazy__ = {"thing": "impl"}\n')
    (pkg / "sub" / "impl.py").write_text("def f():\n    import mopd.b  # codedeps: ignore\n")
    (pkg / "a.py").write_text("from mopd.sub import thing\nfrom typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    import mopd.c\n")
    (pkg / "b.py").write_text("from mopd import a\n")
    (pkg / "c.py").write_text("import mopd.a\n")
    (pkg / "d.py").write_text("from . import c\n")
    graph = import_graph(tmp_path)
    assert graph["mopd.a"] == {"mopd.sub.impl"}  # lazy export; TYPE_CHECKING skipped
    assert graph["mopd.d"] == {"mopd.c"}  # relative import
    assert graph["mopd.sub"] == set()  # no edge from a package to its submodules, nor back
    assert find_cycles(graph) == [["mopd.a", "mopd.sub.impl", "mopd.b", "mopd.a"]]
    assert find_cycles({"x": {"y"}, "y": {"x", "z"}, "z": {"x"}}) == [["x", "y", "x"], ["x", "y", "z", "x"]]


def test_no_import_cycle_in_mopd() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "mopd.config" in graph  # really walked the package
    cycles = find_cycles(graph, limit=200)
    more = "\n... (the first 200 shown)" if len(cycles) == 200 else ""
    assert not cycles, "import cycles in mopd/:\n" + "\n".join(" -> ".join(c) for c in cycles) + more


# --------------------------------------------------------------------------- function shape


def _n_params(args: ast.arguments) -> int:
    positional = [*args.posonlyargs, *args.args]
    if positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    return len(positional) + len(args.kwonlyargs) + (args.vararg is not None) + (args.kwarg is not None)


def _comment_block(lines: list[str], first: int, step: int) -> list[str]:
    """The run of comment lines next to 1-based line ``first`` going ``step`` (-1 up, +1 down),
    stripped; stops at the first line that is not a comment."""
    out, i = [], first - 1
    while 0 <= i < len(lines) and lines[i].strip().startswith("#"):
        out.append(lines[i].strip())
        i += step
    return out


def _justified(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    top = min([node.lineno] + [d.lineno for d in node.decorator_list])
    above = _comment_block(lines, top - 1, -1)
    # first line of the body: the comments right before the first statement (after the signature)
    body = _comment_block(lines, node.body[0].lineno - 1, -1)
    return any(WHY.match(c) for c in above + body)


def shape_offenders(source: str, path: str = "<string>") -> list[str]:
    """``path:line name (N lines, M parameters)`` for each function over the limits without a
    ``# why:`` comment."""
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        n_lines = node.end_lineno - node.lineno + 1
        n_params = _n_params(node.args)
        if (n_lines > MAX_LINES or n_params > MAX_PARAMS) and not _justified(node, lines):
            out.append(f"{path}:{node.lineno} {node.name} ({n_lines} lines, {n_params} parameters)")
    return sorted(out, key=lambda s: (s.split(":")[0], int(s.split(":")[1].split()[0])))


def _long_function(header: str = "", first: str = "") -> str:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    return textwrap.dedent(header) + "@decorator\ndef f(a):\n" + first + body + "\n"


def test_shape_checker_on_synthetic_source() -> None:
    assert shape_offenders(_long_function()) == [f"<string>:2 f ({MAX_LINES + 1} lines, 1 parameters)"]
    assert shape_offenders(_long_function(header="# why: a reason\n")) == []
    assert shape_offenders(_long_function(first="    # why: a reason\n")) == []
    assert shape_offenders(_long_function(header="# why:\n")) != []  # a reason is required
    assert shape_offenders(_long_function(header="# why: a reason\n\n")) != []  # not directly above
    short = "def g(self, a, b, c, d, e, f, g, h):\n    pass\n"  # self does not count: 8
    assert shape_offenders(short) == []
    many = "class K:\n    def g(self, a, b, c, d, e, f, g, *h, i, **j):\n        pass\n"
    assert shape_offenders(many) == ["<string>:2 g (2 lines, 10 parameters)"]
    why = "class K:\n    # note\n    # why: mirrors the inputs\n    @staticmethod\n" \
          "    def g(a, b, c, d, e, f, g, h, i):\n        pass\n"
    assert shape_offenders(why) == []


def test_functions_are_short_or_say_why() -> None:
    offenders = []
    paths = sorted((ROOT / PACKAGE).rglob("*.py"))
    assert len(paths) > 20
    for path in paths:
        offenders += shape_offenders(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    assert not offenders, (f"functions over {MAX_LINES} lines or {MAX_PARAMS} parameters without a "
                           "'# why: <reason>' comment above the def or as the body's first line:\n"
                           + "\n".join(offenders))


def test_loading_the_configuration_imports_no_torch() -> None:
    """The Prefect flow process loads the configuration (every section, the method registry and
    its plugins) and builds the graph: none of it may import torch (flows/ has no torch)."""
    import subprocess
    import sys

    code = ("import sys; from mopd.config import load_config; from mopd.graph import build_graph; "
            "cfg = load_config('.', pipeline='full'); build_graph(cfg); import flows.mopd_flow; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
