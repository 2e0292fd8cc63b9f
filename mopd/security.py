"""Guards for values that come from outside: secrets kept out of logs and MLflow params
(:func:`redact_url`, :func:`redact_secrets`), and the project directories an API client may
point a run at (:func:`allowed_project_dir`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
ROOTS_ENV = "MOPD_PROJECT_ROOTS"
START_DIR = Path.cwd()  # the directory this process (the worker) was started in

# URL query parameters whose values are secrets (?token=..., ?api_key=..., signed URLs' ?sig=...)
_SECRET_PARAM = re.compile(r"(?:^|[_-])(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|key|"
                           r"auth|authorization|credentials?|signature|sig)$", re.I)
# config keys whose values are secrets; narrower ("pad_token", "cache_key" and "token_env", which
# names a variable, are not secrets)
_SECRET_KEY = re.compile(r"(?:^|[_-])(?:password|passwd|secret|api[_-]?key|apikey|access[_-]?token|"
                         r"auth[_-]?token|bearer[_-]?token|credentials?|authorization)$", re.I)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>,]+")


def redact_url(url: str) -> str:
    """``url`` with its credentials masked: ``http://user:pass@host/p?token=x`` ->
    ``http://***@host/p?token=***``. Anything that is not such a URL comes back unchanged."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:  # malformed: still mask whatever precedes an '@'
        return re.sub(r"://[^/@\s]*@", lambda m: f"://{MASK}@", url)
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_PARAM.search(k) else v) for k, v in pairs],
                              safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` (an error message, a command line) redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_secrets(value: Any) -> Any:
    """A copy of a nested config (dicts, lists, strings) safe to log or record: URLs redacted,
    values of secret-named keys (``password``, ``api_key``, ``token``, ...) masked."""
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, "")
                    else redact_secrets(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def project_roots() -> list[Path]:
    """The directories runs may use as their project: ``$MOPD_PROJECT_ROOTS`` (separated by
    ``os.pathsep``, ':' on POSIX) or else the directory the worker was started in."""
    raw = os.environ.get(ROOTS_ENV, "")
    roots = [r for r in raw.split(os.pathsep) if r.strip()]
    return [(START_DIR / Path(r).expanduser()).resolve() for r in roots] or [START_DIR.resolve()]


def allowed_project_dir(path: str | os.PathLike, roots: list[Path] | None = None) -> Path:
    """``path`` resolved (relative to the worker's start directory, symlinks followed) if it is
    one of the allowed roots or lies inside one; else ``PermissionError`` naming the roots and
    the environment variable that sets them. ``roots`` defaults to :func:`project_roots`."""
    allowed = [Path(r).resolve() for r in roots] if roots is not None else project_roots()
    real = (START_DIR / Path(path).expanduser()).resolve()
    if not any(real == r or real.is_relative_to(r) for r in allowed):
        shown = os.pathsep.join(str(r) for r in allowed)
        raise PermissionError(
            f"project_dir {str(path)[:200]!r} resolves to {real}, outside the allowed project "
            f"roots {shown}; set {ROOTS_ENV} (separated by {os.pathsep!r}) on the worker to allow "
            "another directory")
    if not real.is_dir():
        raise NotADirectoryError(f"project_dir {str(path)[:200]!r}: {real} is not a directory")
    return real
