"""Instruction following: IFEval-style format constraints.

A reference is a JSON list of constraints, e.g.
``[{"kind": "uppercase"}, {"kind": "word_count", "n": 3}, {"kind": "keyword", "word": "cat"}]``,
or an object ``{"mode": "all", "constraints": [...]}``. ``mode`` is ``"fraction"`` (default:
reward = share of constraints satisfied) or ``"all"`` (1.0 only if every constraint holds).

Counting constraints take ``n`` (exactly), ``min`` (at least) and/or ``max`` (at most).
Kinds: see ``CHECKERS``. An unknown kind is a data problem: the whole reference scores 0 with a
reason naming the kind, and a warning is logged (once per kind per process).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from mopd.verifiers.verdict import Verdict, as_text

logger = logging.getLogger(__name__)
_warned_kinds: set[str] = set()


class ConstraintError(ValueError):
    """A malformed constraint (missing or mistyped parameter): a data error, not a model error."""


def _count_ok(count: int, c: Mapping[str, Any]) -> bool:
    bounds = {k: c[k] for k in ("n", "min", "max") if k in c}
    if not bounds:
        raise ConstraintError(f"{c.get('kind')}: needs 'n', 'min' or 'max'")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in bounds.values()):
        raise ConstraintError(f"{c.get('kind')}: 'n'/'min'/'max' must be integers, got {bounds}")
    return (count == bounds.get("n", count) and count >= bounds.get("min", count)
            and count <= bounds.get("max", count))


def _param(c: Mapping[str, Any], key: str) -> str:
    value = c.get(key)
    if not isinstance(value, str) or not value:
        raise ConstraintError(f"{c.get('kind')}: needs a non-empty string {key!r}")
    return value


def _words(text: str) -> list[str]:
    return text.split()


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)]


def _paragraphs(text: str, c: Mapping[str, Any]) -> list[str]:
    sep = c.get("separator")
    parts = text.split(sep) if isinstance(sep, str) and sep else re.split(r"\n\s*\n", text)
    return [p for p in parts if p.strip()]


def _bullets(text: str) -> int:
    return len(re.findall(r"^\s*(?:[-*\u2022]\s+|\d+[.)]\s+)\S", text, flags=re.M))


def _is_json(text: str) -> bool:
    body = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text.strip(), flags=re.I)
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _forbidden_ok(text: str, c: Mapping[str, Any]) -> bool:
    words = c.get("words", [c.get("word")])
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise ConstraintError("forbidden: needs 'word' or a list of strings 'words'")
    return not any(re.search(rf"\b{re.escape(w)}\b", text, flags=re.I) for w in words)


def _keyword_ok(text: str, c: Mapping[str, Any]) -> bool:
    count = len(re.findall(re.escape(_param(c, "word")), text, flags=re.I))
    has_bounds = any(k in c for k in ("n", "min", "max"))
    return _count_ok(count, c) if has_bounds else count > 0


def _keywords_ok(text: str, c: Mapping[str, Any]) -> bool:
    words = c.get("words")
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
        raise ConstraintError("keywords: needs a non-empty list of strings 'words'")
    return all(re.search(re.escape(w), text, flags=re.I) for w in words)


def _has_letters(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


CHECKERS: dict[str, Callable[[str, Mapping[str, Any]], bool]] = {
    "uppercase": lambda t, c: _has_letters(t) and t == t.upper(),
    "lowercase": lambda t, c: _has_letters(t) and t == t.lower(),
    "word_count": lambda t, c: _count_ok(len(_words(t)), c),
    "sentence_count": lambda t, c: _count_ok(len(_sentences(t)), c),
    "paragraph_count": lambda t, c: _count_ok(len(_paragraphs(t, c)), c),
    "keyword": _keyword_ok,
    "keywords": _keywords_ok,
    "forbidden": _forbidden_ok,
    "json_format": lambda t, c: _is_json(t),
    "placeholders": lambda t, c: _count_ok(len(re.findall(r"\[[^\[\]\n]+\]", t)), c),
    "starts_with": lambda t, c: t.strip().lower().startswith(_param(c, "phrase").lower()),
    "ends_with": lambda t, c: t.strip().lower().endswith(_param(c, "phrase").lower()),
    "bullet_count": lambda t, c: _count_ok(_bullets(t), c),
    "letter_frequency": lambda t, c: _count_ok(t.lower().count(_param(c, "letter").lower()), c),
    "no_commas": lambda t, c: "," not in t,
    "quotation": lambda t, c: len(t.strip()) > 1 and t.strip()[0] == t.strip()[-1] == '"',
    "title": lambda t, c: re.search(r"<<[^\n<>]+>>", t) is not None,
    "postscript": lambda t, c: re.search(
        rf"^\s*{re.escape(c.get('marker', 'P.S.'))}", t, flags=re.M | re.I) is not None,
    "capital_words": lambda t, c: _count_ok(sum(w.isupper() for w in _words(t)), c),
}


def parse_reference(reference: str) -> tuple[list[Mapping[str, Any]], str]:
    """``(constraints, mode)`` from a JSON reference; ConstraintError when malformed."""
    try:
        spec = json.loads(reference)
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"reference is not JSON: {str(reference)[:80]!r}") from exc
    mode = "fraction"
    if isinstance(spec, Mapping):
        mode = spec.get("mode", "fraction")
        spec = spec.get("constraints")
    if mode not in ("fraction", "all"):
        raise ConstraintError(f"mode must be 'fraction' or 'all', got {mode!r}")
    if not isinstance(spec, list) or not spec or not all(isinstance(c, Mapping) for c in spec):
        raise ConstraintError("reference must be a non-empty list of constraint objects")
    return spec, mode


def verify_if(response: object, reference: str) -> Verdict:
    """Score ``response`` against the constraints in ``reference`` (see module docstring)."""
    try:
        constraints, mode = parse_reference(reference)
    except ConstraintError as exc:
        logger.error("if verifier: bad reference: %s", exc)
        return Verdict(0.0, f"bad reference: {exc}")
    unknown = sorted({str(c.get("kind")) for c in constraints} - set(CHECKERS))
    if unknown:
        for kind in set(unknown) - _warned_kinds:
            logger.warning("if verifier: unknown constraint kind %r (scored 0)", kind)
            _warned_kinds.add(kind)
        return Verdict(0.0, f"unknown constraint kind(s) {unknown}")
    text, why = as_text(response)
    if text is None:
        return Verdict(0.0, why)
    failed = []
    try:
        for c in constraints:
            if not CHECKERS[c["kind"]](text, c):
                failed.append(c["kind"])
    except ConstraintError as exc:
        logger.error("if verifier: bad constraint: %s", exc)
        return Verdict(0.0, f"bad reference: {exc}")
    share = 1.0 - len(failed) / len(constraints)
    reward = share if mode == "fraction" else float(not failed)
    return Verdict(reward, "all constraints met" if not failed else f"failed: {', '.join(failed)}")


# IFEval instruction id -> (our kind, {our parameter: IFEval kwarg}); relation handled below.
_IFEVAL_MAP: dict[str, tuple[str, dict[str, str]]] = {
    "change_case:english_capital": ("uppercase", {}),
    "change_case:english_lowercase": ("lowercase", {}),
    "change_case:capital_word_frequency": ("capital_words", {"_n": "capital_frequency",
                                                             "_rel": "capital_relation"}),
    "length_constraints:number_words": ("word_count", {"_n": "num_words", "_rel": "relation"}),
    "length_constraints:number_sentences": ("sentence_count", {"_n": "num_sentences",
                                                               "_rel": "relation"}),
    "length_constraints:number_paragraphs": ("paragraph_count", {"_n": "num_paragraphs"}),
    "keywords:frequency": ("keyword", {"word": "keyword", "_n": "frequency", "_rel": "relation"}),
    "keywords:forbidden_words": ("forbidden", {"words": "forbidden_words"}),
    "keywords:letter_frequency": ("letter_frequency", {"letter": "letter", "_n": "let_frequency",
                                                       "_rel": "let_relation"}),
    "detectable_format:json_format": ("json_format", {}),
    "detectable_format:number_bullet_lists": ("bullet_count", {"_n": "num_bullets"}),
    "detectable_format:title": ("title", {}),
    "detectable_content:number_placeholders": ("placeholders", {"_min": "num_placeholders"}),
    "detectable_content:postscript": ("postscript", {"marker": "postscript_marker"}),
    "startend:end_checker": ("ends_with", {"phrase": "end_phrase"}),
    "startend:quotation": ("quotation", {}),
    "punctuation:no_comma": ("no_commas", {}),
}


def from_ifeval(instruction_id: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """One IFEval instruction as our constraint; unmapped ids become kind ``ifeval:<id>``."""
    if instruction_id == "keywords:existence":
        return {"kind": "keywords", "words": list(kwargs.get("keywords") or [])}
    if instruction_id not in _IFEVAL_MAP:
        return {"kind": f"ifeval:{instruction_id}"}
    kind, params = _IFEVAL_MAP[instruction_id]
    out: dict[str, Any] = {"kind": kind}
    relation = kwargs.get(params.get("_rel", ""), None)
    for ours, theirs in params.items():
        value = kwargs.get(theirs)
        if ours == "_n" and value is not None:
            n = int(value)
            if relation == "less than":
                out["max"] = n - 1
            elif relation == "at least":
                out["min"] = n
            else:
                out["n"] = n
        elif ours == "_min" and value is not None:
            out["min"] = int(value)
        elif not ours.startswith("_") and value is not None:
            out[ours] = value
    return out
