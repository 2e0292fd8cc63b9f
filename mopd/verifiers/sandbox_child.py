"""The program that runs INSIDE the sandbox (``python -I -S -c <this file's text>``).

It reads ``{"code", "tests", "nonce", "limits"}`` (``marshal``-encoded: json would import
``re``, ~7 ms per program) on stdin, sets rlimits, moves the model's stdout onto stderr, runs the
solution then the tests in one namespace, and writes exactly one report line
``nonce<TAB>status<TAB>detail`` on the original stdout. The host trusts only a line that carries
the nonce, so an early ``os._exit(0)`` or a printed fake report does not pass.
Built-in modules only; no imports from mopd (the package is not visible in the sandbox).
"""

import _signal  # the `signal` wrapper imports enum (~3 ms per program); the C module suffices
import marshal
import os
import resource
import sys


def _classify(exc, where):
    name = type(exc).__name__
    try:
        text = str(exc)[:200]
    except BaseException:  # a hostile __str__
        text = "?"
    if isinstance(exc, MemoryError):
        return "memory", f"MemoryError in {where}"
    if isinstance(exc, RecursionError):
        return "recursion limit", f"RecursionError in {where}"
    if isinstance(exc, SystemExit):
        return "exited early", f"SystemExit in {where}"
    if isinstance(exc, AssertionError) and where == "tests":
        return "assertion failed", text
    return "runtime error", f"{name} in {where}: {text}"


def _set_limits(lim):
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)  # oversized writes fail with EFBIG instead
    pairs = ((resource.RLIMIT_AS, lim["memory_bytes"]), (resource.RLIMIT_NPROC, lim["nproc"]),
             (resource.RLIMIT_FSIZE, lim["file_bytes"]), (resource.RLIMIT_NOFILE, lim["nofile"]),
             (resource.RLIMIT_STACK, min(lim["memory_bytes"] // 4, 64 << 20)),
             (resource.RLIMIT_CORE, 0))
    for res, value in pairs:
        resource.setrlimit(res, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))


def main():
    # Bind what the report needs before model code can monkeypatch modules.
    write, exit_now, flush_out, flush_err = (os.write, os._exit, sys.stdout.flush,
                                             sys.stderr.flush)
    cfg = marshal.loads(sys.stdin.buffer.read())
    nonce = cfg.pop("nonce")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    status_fd = os.dup(1)  # non-inheritable: children of the program do not get it
    os.dup2(2, 1)  # the program's prints go to stderr (capped by the host)

    def report(status, detail=""):
        for flush in (flush_out, flush_err):
            try:
                flush()
            except BaseException:
                pass
        detail = "".join(" " if ch in "\t\r\n" else ch for ch in str(detail)[:300])
        line = f"{nonce}\t{status}\t{detail}\n"
        write(status_fd, line.encode("utf-8", "replace"))
        exit_now(0)

    _set_limits(cfg["limits"])
    compiled = {}
    for where in ("solution", "tests"):
        try:
            compiled[where] = compile(cfg["code" if where == "solution" else "tests"],
                                      f"<{where}>", "exec")
        except (SyntaxError, ValueError) as exc:  # ValueError: null bytes in source
            line = getattr(exc, "lineno", None)
            report("syntax error" if where == "solution" else "bad tests",
                   f"{type(exc).__name__} in {where}"
                   + (f" line {line}" if line else f": {str(exc)[:100]}"))
        except BaseException as exc:
            report(*_classify(exc, where))
    del cfg
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    for where in ("solution", "tests"):
        try:
            exec(compiled[where], namespace)
        except BaseException as exc:
            report(*_classify(exc, where))
    report("passed")


if __name__ == "__main__":
    main()
