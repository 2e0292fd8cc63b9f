"""Code: run the response's Python against the reference's asserts in the sandbox."""

from __future__ import annotations

import re
import threading

from mopd.verifiers.sandbox import Sandbox
from mopd.verifiers.verdict import Verdict, as_text

MAX_CODE_CHARS = 20_000
_FENCE_RE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.S | re.I)

_default_sandbox: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    """The process-wide sandbox with default limits (created on first use)."""
    global _default_sandbox
    with _default_lock:
        if _default_sandbox is None:
            _default_sandbox = Sandbox()
        return _default_sandbox


def extract_code(response: str) -> str:
    """The last fenced ```python block if there is one (else any fenced block), else the text."""
    blocks = _FENCE_RE.findall(response)
    return blocks[-1] if blocks else response


def verify_code(response: object, reference: str, sandbox: Sandbox | None = None) -> Verdict:
    """Reward 1.0 when the response's code passes every assert in ``reference``.

    Raises SandboxUnavailable (once, on first use) when no safe sandbox exists and unsandboxed
    execution was not allowed: that is a set-up error, not a property of the response.
    """
    text, why = as_text(response, limit=MAX_CODE_CHARS * 4)
    if text is None:
        return Verdict(0.0, why)
    code = extract_code(text)
    if not code.strip():
        return Verdict(0.0, "empty program")
    if len(code) > MAX_CODE_CHARS:
        return Verdict(0.0, f"program longer than {MAX_CODE_CHARS} characters")
    result = (sandbox or default_sandbox()).run(code, str(reference))
    if result.passed:
        return Verdict(1.0, "passed")
    return Verdict(0.0, f"{result.status}: {result.detail}" if result.detail else result.status)
