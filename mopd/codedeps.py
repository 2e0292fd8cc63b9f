"""Per-stage code identity: the project modules a stage module imports (its import closure
inside the project's packages), found statically, without importing anything.

A stage's cache key and its ``dvc.yaml`` deps cover exactly these files (compare Bazel/Pants: a
target depends on its own sources, not the repository), so editing a distillation loss reruns
the stages that import it and leaves SFT and the teachers alone.

Rules: every ``import`` / ``from ... import`` anywhere in a module counts (function-level imports
too: they run when the stage runs), except under ``if TYPE_CHECKING:`` and
``if __name__ == "__main__":`` (the command-line entry, which only hands over to the runner).
``from pkg import name`` counts ``pkg.name`` when that is a module. Importing ``a.b.c`` runs
``a/__init__.py`` and ``a/b/__init__.py``, so they count. A module that runs another project
file without importing it (a subprocess, a file read as source) names it in a module-level
``__mopd_deps__ = ("mopd.verifiers.sandbox_child", ...)`` tuple of module names. A package
whose exports are lazy (PEP 562) lists them in ``__mopd_lazy__ = {name: submodule}``, so
``from pkg import name`` counts exactly that submodule. A package whose modules are imported by
discovery (``pkgutil``: method plugins) sets ``__mopd_plugins__ = True``, so importing the package
counts every module in it. An import line marked
``# codedeps: ignore`` does not count: for imports that cannot change what a stage computes
(configuration *validation* reading the stage table, say), so that editing the table does not
retrain every teacher.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGES = ("mopd", "tasks")
DEPS_VAR = "__mopd_deps__"
PRAGMA = "codedeps: ignore"
LAZY_VAR = "__mopd_lazy__"  # a package's {exported name: submodule} for PEP 562 lazy exports
PLUGINS_VAR = "__mopd_plugins__"  # a package whose every module is imported by discovery


def project_root() -> Path:
    """The directory holding the project's packages (where ``mopd`` is imported from)."""
    import mopd

    return Path(mopd.__file__).resolve().parents[1]


def module_file(name: str, root: Path) -> Path | None:
    """``mopd.objectives.opd`` -> ``<root>/mopd/objectives/opd.py`` (or a package __init__)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _skipped_block(node: ast.If) -> bool:
    test = ast.unparse(node.test)
    return test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or "__name__" in test and "__main__" in test


def _collect(node: ast.AST, package: str, out: list[str], lines: list[str]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _skipped_block(child):
            for sub in child.orelse:  # the else branch still runs
                _collect(sub, package, out, lines)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)) and PRAGMA in lines[child.lineno - 1]:
            continue
        if isinstance(child, ast.Import):
            out.extend(a.name for a in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:  # relative import: resolve against the module's package
                parts = package.split(".")
                parts = parts[: len(parts) - child.level + 1]
                mod = ".".join(parts + ([child.module] if child.module else []))
            else:
                mod = child.module or ""
            out.append(mod)
            out.extend(f"{mod}.{a.name}" for a in child.names if a.name != "*")
        elif isinstance(child, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == DEPS_VAR for t in child.targets):
            out.extend(ast.literal_eval(child.value))
        _collect(child, package, out, lines)


@lru_cache(maxsize=1024)
def _imports(path: str, mtime_ns: int, size: int, package: str) -> tuple[str, ...]:
    out: list[str] = []
    text = Path(path).read_text(encoding="utf-8")
    _collect(ast.parse(text, filename=path), package, out, text.splitlines())
    return tuple(out)


def _module_constant(path: str, name: str):
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    return None


@lru_cache(maxsize=256)
def _lazy_exports(path: str, mtime_ns: int, size: int) -> dict[str, str]:
    return dict(_module_constant(path, LAZY_VAR) or {})


@lru_cache(maxsize=256)
def _is_plugin_package(path: str, mtime_ns: int, size: int) -> bool:
    return bool(_module_constant(path, PLUGINS_VAR))


def _plugins(init: Path, package: str) -> list[str]:
    """The modules of a ``__mopd_plugins__`` package (none for another package)."""
    stat = init.stat()
    if not _is_plugin_package(str(init), stat.st_mtime_ns, stat.st_size):
        return []
    return [f"{package}.{p.stem}" for p in sorted(init.parent.glob("*.py")) if p.name != "__init__.py"]


def _resolve_lazy(name: str, root: Path) -> str | None:
    """``mopd.objectives.OBJECTIVES`` -> ``mopd.objectives.registry`` through the package's
    lazy-export table; None when ``name`` is not such an export."""
    pkg, _, attr = name.rpartition(".")
    init = module_file(pkg, root)
    if init is None or init.name != "__init__.py":
        return None
    stat = init.stat()
    sub = _lazy_exports(str(init), stat.st_mtime_ns, stat.st_size).get(attr)
    return f"{pkg}.{sub}" if sub else None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_closure(module: str, root: Path | None = None) -> list[Path]:
    """The project files ``module`` runs when imported (itself included), sorted."""
    root = root or project_root()
    seen: dict[Path, None] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if module_file(name, root) is None and (lazy := _resolve_lazy(name, root)):
            name = lazy
        parts = name.split(".")
        # importing a.b.c runs the __init__ of a and a.b first
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]), root)
            if path is None or path in seen:
                continue
            seen[path] = None
            is_pkg = path.name == "__init__.py"
            package = ".".join(parts[:i]) if is_pkg else ".".join(parts[: i - 1])
            stat = path.stat()
            todo.extend(_imports(str(path), stat.st_mtime_ns, stat.st_size, package))
            if is_pkg:
                todo.extend(_plugins(path, package))
    return sorted(seen)


def code_files(module: str, root: Path | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` of the import closure: a stage's code version."""
    root = root or project_root()
    return {p.relative_to(root).as_posix(): _digest(p) for p in import_closure(module, root)}
