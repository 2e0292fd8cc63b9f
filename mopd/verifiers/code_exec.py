"""Code: run the reference's tests against the response's Python in the sandbox.

The tests (assert lines, or HumanEval's ``def check(candidate)`` + ``check(entry_point)``) run in
a judge process; the names they use that the program defines are called in a separate process
and only plain data comes back (see ``sandbox_child.py``).
"""

from __future__ import annotations

import ast
import builtins
import re
import threading

from mopd.verifiers.sandbox import Sandbox
from mopd.verifiers.verdict import Verdict, as_text

MAX_CODE_CHARS = 20_000
# A fenced block: ``` + optional language tag, any line ending, body, closing ```.
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\S\r\n]*\r?\n(.*?)```", re.S)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}

_default_sandbox: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    """The process-wide sandbox with default limits (created on first use)."""
    global _default_sandbox
    with _default_lock:
        if _default_sandbox is None:
            _default_sandbox = Sandbox()
        return _default_sandbox


def _defined_names(code: str) -> set[str] | None:
    """Top-level names a block binds (def, class, assignment, import), None if it does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def called_names(tests: str) -> set[str]:
    """Names the tests use but do not define themselves (what the program must provide)."""
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return set()
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - (_defined_names(tests) or set()) - set(dir(builtins))


def extract_code(response: str, tests: str = "") -> str:
    """The program in a response.

    Fenced blocks (any line ending; untagged or tagged python) are candidates; among them the
    last one that defines a name the tests use wins (a usage example after the solution does
    not), else the last Python block. Without fences the whole response is the program.
    """
    blocks = [body for tag, body in _FENCE_RE.findall(response)
              if tag.lower() in _PYTHON_TAGS]
    if not blocks:
        return response.replace("\r\n", "\n")
    blocks = [b.replace("\r\n", "\n") for b in blocks]
    wanted = called_names(tests) if tests else set()
    if wanted:
        for block in reversed(blocks):
            if (_defined_names(block) or set()) & wanted:
                return block
    return blocks[-1]


def verify_code(response: object, reference: str, sandbox: Sandbox | None = None) -> Verdict:
    """Reward 1.0 when the response's code passes every test in ``reference``.

    Raises SandboxUnavailable (once, on first use) when no safe sandbox exists and unsandboxed
    execution was not allowed: that is a set-up error, not a property of the response.
    """
    program = program_of(response, reference)
    if isinstance(program, Verdict):
        return program
    return run_program(program, str(reference), sandbox)


def program_of(response: object, reference: str) -> str | Verdict:
    """The program a response submits, or the verdict that it submits none (not text, empty,
    too long): what decides the sandbox's outcome besides the tests, so ``verify_batch`` runs
    each distinct (program, tests) pair of a batch once."""
    text, why = as_text(response, limit=MAX_CODE_CHARS * 4)
    if text is None:
        return Verdict(0.0, why)
    code = extract_code(text, str(reference))
    if not code.strip():
        return Verdict(0.0, "empty program")
    if len(code) > MAX_CODE_CHARS:
        return Verdict(0.0, f"program longer than {MAX_CODE_CHARS} characters")
    return code


def run_program(code: str, tests: str, sandbox: Sandbox | None = None) -> Verdict:
    """Run ``code`` against ``tests`` in the sandbox: 1.0 when every test passes."""
    result = (sandbox or default_sandbox()).run(code, tests)
    if result.passed:
        return Verdict(1.0, "passed")
    return Verdict(0.0, f"{result.status}: {result.detail}" if result.detail else result.status)
