"""The verdict every verifier returns, and input coercion shared by all of them."""

from __future__ import annotations

from dataclasses import dataclass

# Longest response any verifier looks at; longer model output is cut before parsing so a
# pathological response cannot make a regex or sympy spin. Code has its own (smaller) cap.
MAX_RESPONSE_CHARS = 100_000


@dataclass(frozen=True)
class Verdict:
    """``reward`` in [0, 1]; ``reason`` says why, in a few words ("correct", "timeout", ...)."""

    reward: float
    reason: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.reward <= 1.0:
            raise ValueError(f"Verdict.reward must lie in [0, 1], got {self.reward}")


def as_text(value: object, limit: int = MAX_RESPONSE_CHARS) -> tuple[str | None, str]:
    """Model output as ``str`` (bytes decoded with replacement), or ``(None, why)`` if unusable."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None, f"response is {type(value).__name__}, not text"
    if len(value) > limit:
        return value[:limit], "truncated"
    return value, ""
