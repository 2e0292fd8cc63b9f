"""Verifiers: ``verify(kind, response, reference) -> Verdict`` for math, code, if, mc.

Verifiers never raise on model output (garbage, empty, huge, bytes): they return reward 0 and a
reason. The one exception is set-up: code verification raises ``SandboxUnavailable`` when no
safe sandbox can run here and unsandboxed execution was not explicitly allowed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from mopd.verifiers.choice import verify_mc
from mopd.verifiers.code_exec import default_sandbox, program_of, run_program, verify_code
from mopd.verifiers.ifeval import verify_if
from mopd.verifiers.math_answer import verify_math
from mopd.verifiers.sandbox import Sandbox, SandboxLimits, SandboxUnavailable
from mopd.verifiers.verdict import Verdict

logger = logging.getLogger(__name__)

__all__ = ["VERIFIERS", "Sandbox", "SandboxLimits", "SandboxUnavailable", "Verdict",
           "default_workers", "verify", "verify_batch"]

VERIFIERS: dict[str, Callable[[object, str], Verdict]] = {
    "math": verify_math,
    "code": verify_code,
    "if": verify_if,
    "mc": verify_mc,
}


def default_workers() -> int:
    """Parallel sandboxes used by verify_batch when ``workers`` is not given."""
    return min(16, 4 * len(os.sched_getaffinity(0)))


def _check_kind(kind: str) -> None:
    if kind not in VERIFIERS:
        raise ValueError(f"unknown verifier kind {kind!r}; known: {sorted(VERIFIERS)}")


def verify(domain_kind: str, response: object, reference: str) -> Verdict:
    """Score one response. ``domain_kind`` is a verifier kind ("math", "code", "if", "mc")."""
    _check_kind(domain_kind)
    fn = VERIFIERS[domain_kind]
    try:
        return fn(response, reference)
    except SandboxUnavailable:
        raise
    except Exception as exc:  # last line of defence: a verifier bug must not kill a run
        logger.exception("%s verifier crashed on a response", domain_kind)
        return Verdict(0.0, f"verifier error: {type(exc).__name__}")


def verify_batch(kinds: Sequence[str], responses: Sequence[object], references: Sequence[str],
                 *, workers: int | None = None, sandbox: Sandbox | None = None) -> list[Verdict]:
    """Score many responses; code runs in ``workers`` parallel sandboxes.

    ``workers`` defaults to 4 x the CPU count (at most 16): much of a sandbox's life is kernel namespace
    set-up and tear-down latency rather than CPU, so on 2 cores 8 workers verify ~2.5x more
    programs per second than 2 (see benchmarks/verifiers.py). Returns verdicts in input order.
    Math/if/mc run in the calling thread (CPU-bound Python; math-verify's timeouts need the
    main thread).
    """
    if not len(kinds) == len(responses) == len(references):
        raise ValueError(f"verify_batch: lengths differ (kinds {len(kinds)}, "
                         f"responses {len(responses)}, references {len(references)})")
    for kind in set(kinds):
        _check_kind(kind)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    verdicts: list[Verdict | None] = [None] * len(kinds)
    code_idx = [i for i, k in enumerate(kinds) if k == "code"]
    if not code_idx:
        return [verify(k, r, ref) for k, r, ref in zip(kinds, responses, references)]
    box = sandbox or default_sandbox()
    box.mode  # noqa: B018 - set up (and raise SandboxUnavailable) before fanning out
    # Each distinct (program, tests) pair runs once: the samples of one prompt repeat each other
    # (a GRPO group, avg@k's n samples); 56-74% of the code rollouts of a tiny-profile evaluation
    # were repeats. A program that is not deterministic gets one verdict per batch.
    runs: dict[tuple[str, str], list[int]] = {}
    for i in code_idx:
        program = _program_safe(responses[i], references[i])
        if isinstance(program, Verdict):
            verdicts[i] = program
        else:
            runs.setdefault((program, str(references[i])), []).append(i)
    with ThreadPoolExecutor(max_workers=max(1, min(len(runs), workers or default_workers()))) as pool:
        futures = {key: pool.submit(_run_safe, *key, box) for key in runs}
        for i, kind in enumerate(kinds):  # the rest runs here while the sandboxes work
            if kind != "code":
                verdicts[i] = verify(kind, responses[i], references[i])
        for key, future in futures.items():
            verdict = future.result()
            for i in runs[key]:
                verdicts[i] = verdict
    return verdicts  # type: ignore[return-value]


def _program_safe(response: object, reference: str) -> str | Verdict:
    try:
        return program_of(response, reference)
    except Exception as exc:
        logger.exception("code verifier crashed on a response")
        return Verdict(0.0, f"verifier error: {type(exc).__name__}")


def _run_safe(code: str, tests: str, sandbox: Sandbox) -> Verdict:
    try:
        return run_program(code, tests, sandbox)
    except SandboxUnavailable:
        raise
    except Exception as exc:
        logger.exception("code verifier crashed on a response")
        return Verdict(0.0, f"verifier error: {type(exc).__name__}")
