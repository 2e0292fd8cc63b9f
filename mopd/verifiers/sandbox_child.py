"""The program that runs INSIDE the sandbox (``python -I -S``; its code object, compiled once
by the same interpreter outside, arrives on stdin ahead of the payload; see ``sandbox.py``).

Two processes, so that the verdict lives outside the solution's reach:

- the **judge** (started by the host; pid 1 of the sandbox's pid namespace, so nothing inside
  can signal it) first makes itself non-dumpable (so a process of the same uid can neither
  ptrace it, read its memory nor open its file descriptors through ``/proc``), then reads only
  the first block of its stdin, ``{"code", "limits"}``, and forks the **solution** process.
  Only after that fork does it read the second block, ``{"tests", "nonce"}``: no copy of the
  tests, the expected values or the nonce is ever in the solution's address space, and the
  solution has no descriptor of stdin or of the report channel. The judge then runs the tests.
  Every name the tests use that the solution defines is replaced by a proxy: calling it sends
  the arguments to the solution process and returns its result, decoded from bytes into new
  built-in objects (``None``, bool, int, float, complex, str, bytes, list, tuple, dict, set,
  frozenset, nothing else). An object with a custom ``__eq__``, a subclass of ``int``, a
  generator... is not plain data: the call fails and so does the verdict. The judge writes
  exactly one report line ``nonce<TAB>status<TAB>detail`` on the original stdout.
- the **solution** process runs the program, answers ``names`` and ``call`` requests on two
  pipes, and prints to stderr. Whatever it does to itself (patched builtins, frames, ``gc``,
  ``__main__``, ``sys.exit``, fake report lines) cannot change the judge's comparison.

Built-in modules only (``_ctypes`` for ``prctl``); no imports from mopd (the package is not
visible in the sandbox). Exceptions the program raises reach the tests as the same built-in
type only for ordinary errors (``ValueError``...); a ``StopIteration`` would end a trusted
``all(map(...))`` early, so it and other control-flow exceptions arrive as ``RuntimeError``.
Arguments and results are copies: the tests never see the program mutate an argument. Wire format: 4-byte big-endian length + a tagged encoding (see
``encode``); the decoder builds only built-in objects, bounded in depth and size.
"""

import _signal  # the `signal` wrapper imports enum (~3 ms per program); the C module suffices
import marshal
import os
import resource
import sys

MAX_MESSAGE = 8 << 20
MAX_DEPTH = 200
_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4


class NotPlainData(TypeError):
    """A value that is not built-in plain data (raised by ``encode``)."""


class ProtocolBroken(BaseException):
    """The solution process died, lied about its framing, or returned non-plain data.

    A BaseException so that a test's ``except Exception`` cannot swallow it."""


# ------------------------------------------------------------------------------ plain data


def _enc(x, out, depth):
    if depth > MAX_DEPTH:
        raise NotPlainData("nested too deeply")
    t = type(x)  # type(), not isinstance: subclasses of int/str/list... are not plain data
    if x is None:
        out.append(b"N")
    elif x is True:
        out.append(b"T")
    elif x is False:
        out.append(b"F")
    elif t is int:
        out.append(b"i%x;" % x if x >= 0 else b"i-%x;" % -x)
    elif t is float:
        out.append(b"f" + x.hex().encode() + b";")
    elif t is complex:
        out.append(b"c" + x.real.hex().encode() + b";" + x.imag.hex().encode() + b";")
    elif t is str:
        data = x.encode("utf-8", "surrogatepass")
        out.append(b"s%d:" % len(data))
        out.append(data)
    elif t is bytes:
        out.append(b"b%d:" % len(x))
        out.append(x)
    elif t is list or t is tuple or t is set or t is frozenset:
        tag = b"l" if t is list else b"t" if t is tuple else b"S" if t is set else b"Z"
        items = list(x)
        out.append(tag + b"%d;" % len(items))
        for item in items:
            _enc(item, out, depth + 1)
    elif t is dict:
        items = list(x.items())
        out.append(b"d%d;" % len(items))
        for key, value in items:
            _enc(key, out, depth + 1)
            _enc(value, out, depth + 1)
    else:
        raise NotPlainData(f"{t.__name__} is not plain data")


def encode(x):
    out = []
    _enc(x, out, 0)
    data = b"".join(out)
    if len(data) > MAX_MESSAGE:
        raise NotPlainData(f"value larger than {MAX_MESSAGE} bytes")
    return data


def _field(data, pos, end_char):
    end = data.index(end_char, pos)
    if end - pos > 64:  # every number/length field is short
        raise ValueError("field too long")
    return data[pos:end].decode("ascii"), end + 1


def _dec(data, pos, depth):
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    tag = data[pos:pos + 1]
    pos += 1
    if tag == b"N":
        return None, pos
    if tag == b"T":
        return True, pos
    if tag == b"F":
        return False, pos
    if tag == b"i":
        end = data.index(b";", pos)
        text = data[pos:end].decode("ascii")
        if not text or text.strip("-0123456789abcdef"):
            raise ValueError("bad int")
        return int(text, 16), end + 1
    if tag == b"f":
        text, pos = _field(data, pos, b";")
        return float.fromhex(text), pos
    if tag == b"c":
        real, pos = _field(data, pos, b";")
        imag, pos = _field(data, pos, b";")
        return complex(float.fromhex(real), float.fromhex(imag)), pos
    if tag in (b"s", b"b"):
        text, pos = _field(data, pos, b":")
        size = int(text)
        if size < 0 or pos + size > len(data):
            raise ValueError("truncated")
        raw = data[pos:pos + size]
        return (raw.decode("utf-8", "surrogatepass") if tag == b"s" else bytes(raw)), pos + size
    if tag in (b"l", b"t", b"S", b"Z", b"d"):
        text, pos = _field(data, pos, b";")
        count = int(text)
        if count < 0 or count > len(data) - pos:  # every item takes at least one byte
            raise ValueError("bad count")
        if tag == b"d":
            out = {}
            for _ in range(count):
                key, pos = _dec(data, pos, depth + 1)
                value, pos = _dec(data, pos, depth + 1)
                out[key] = value
            return out, pos
        items = []
        for _ in range(count):
            item, pos = _dec(data, pos, depth + 1)
            items.append(item)
        kind = {b"l": list, b"t": tuple, b"S": set, b"Z": frozenset}[tag]
        return (items if kind is list else kind(items)), pos
    raise ValueError(f"bad tag {tag!r}")


def decode(data):
    """Built-in objects from ``encode``'s bytes; ValueError/TypeError on anything else."""
    value, pos = _dec(bytes(data), 0, 0)
    if pos != len(data):
        raise ValueError("trailing bytes")
    return value


def _read_exact(fd, n):
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send(fd, obj):
    data = encode(obj)
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        view = view[os.write(fd, view):]


def recv(fd):
    size = int.from_bytes(_read_exact(fd, 4), "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes")
    return decode(_read_exact(fd, size))


# -------------------------------------------------------------------------------- helpers


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
    pairs = ((resource.RLIMIT_AS, lim["memory_bytes"]), (resource.RLIMIT_FSIZE, lim["file_bytes"]), (resource.RLIMIT_NOFILE, lim["nofile"]),
             (resource.RLIMIT_STACK, min(lim["memory_bytes"] // 4, 64 << 20)),
             (resource.RLIMIT_CORE, 0))
    for res, value in pairs:
        resource.setrlimit(res, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))


def _limit_nproc(lim):
    """RLIMIT_NPROC, set by each process after the judge forked: the limit counts every task
    of the uid (in unsandboxed mode: every uid-65534 process on the host), so a judge that set
    it before forking could fail to start the solution when other sandboxes are running."""
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))


def _exit_status(status):
    """(status, detail) for the solution process's wait status."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum == _signal.SIGXCPU:
            return "timeout", "cpu time limit"
        if signum == _signal.SIGKILL:
            return "killed", "SIGKILL (memory or limit)"
        names = {_signal.SIGSEGV: "SIGSEGV", _signal.SIGABRT: "SIGABRT", _signal.SIGBUS: "SIGBUS",
                 _signal.SIGFPE: "SIGFPE", _signal.SIGILL: "SIGILL", _signal.SIGTERM: "SIGTERM"}
        return "crashed", f"signal {names.get(signum, signum)}"
    return "exited early", f"exit code {os.waitstatus_to_exitcode(status)} in solution"


# ------------------------------------------------------------------------ solution process


def _describe(value):
    """What the judge may see of a top-level name: a callable, a module, plain data, or not."""
    if callable(value):
        return ("f",)
    if type(value).__name__ == "module":
        return ("m", getattr(value, "__name__", ""))
    try:
        encode(value)
    except NotPlainData as exc:
        return ("o", str(exc))
    return ("v", value)


def solution_main(code, req_fd, resp_fd):
    """Runs in the forked solution process; never returns."""
    try:
        _serve(code, req_fd, resp_fd)
    except EOFError:  # the judge is done
        pass
    finally:
        os._exit(0)


def _serve(code, req_fd, resp_fd):
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        compiled = compile(code, "<solution>", "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes in source
        line = getattr(exc, "lineno", None)
        send(resp_fd, ("error", "syntax error", f"{type(exc).__name__} in solution"
                       + (f" line {line}" if line else f": {str(exc)[:100]}")))
        os._exit(0)
    del code
    try:
        exec(compiled, namespace)
    except BaseException as exc:
        send(resp_fd, ("error",) + _classify(exc, "solution"))
        os._exit(0)
    send(resp_fd, ("ready",))
    while True:
        request = recv(req_fd)
        if request[0] == "names":
            send(resp_fd, {n: _describe(namespace[n]) for n in request[1] if n in namespace})
            continue
        _, name, args, kwargs = request
        try:
            result = namespace[name](*args, **kwargs)
        except BaseException as exc:
            try:
                text = str(exc)[:200]
            except BaseException:
                text = "?"
            send(resp_fd, ("raise", type(exc).__name__, text))
            continue
        try:
            send(resp_fd, ("ok", result))
        except NotPlainData as exc:
            send(resp_fd, ("bad", f"result of {name}: {exc}"))


# ---------------------------------------------------------------------------------- judge


class _Remote:
    """The judge's side of the pipes to the solution process."""

    def __init__(self, pid, req_w, resp_r):
        self.pid, self.req_w, self.resp_r = pid, req_w, resp_r
        self.broken = None  # (status, detail) once the solution process misbehaved

    def _fail(self, status, detail):
        if self.broken is None:
            self.broken = (status, detail)
        raise ProtocolBroken(detail)

    def request(self, message):
        if self.broken is not None:
            raise ProtocolBroken(self.broken[1])
        try:
            send(self.req_w, message)
            return recv(self.resp_r)
        except (EOFError, OSError):
            self._fail(*self.died())
        except (ValueError, TypeError, IndexError, OverflowError, MemoryError, RecursionError):
            self._fail("not plain data", "malformed reply from the solution process")

    def died(self):
        """Why the solution process stopped answering (reaps it)."""
        try:
            os.close(self.req_w)
        except OSError:
            pass
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "exited early", "solution process vanished"
        return _exit_status(status)

    def call(self, name, args, kwargs):
        try:
            encode((args, kwargs))
        except NotPlainData as exc:
            raise TypeError(f"tests pass an argument that is not plain data: {exc}") from None
        reply = self.request(("call", name, args, kwargs))
        if type(reply) is not tuple or not reply:
            self._fail("not plain data", "malformed reply from the solution process")
        if reply[0] == "ok" and len(reply) == 2:
            return reply[1]
        if reply[0] == "raise" and len(reply) == 3:
            raise _exception(reply[1], reply[2])
        if reply[0] == "bad" and len(reply) == 2:
            self._fail("not plain data", str(reply[1])[:200])
        self._fail("not plain data", "malformed reply from the solution process")


# Exception types the candidate's errors keep in the judge. Others become RuntimeError: a
# StopIteration, say, would end a trusted ``all(map(...))`` early and make it pass.
_KEPT_EXCEPTIONS = frozenset({
    "ValueError", "TypeError", "KeyError", "IndexError", "AttributeError", "ZeroDivisionError",
    "ArithmeticError", "OverflowError", "NotImplementedError", "RuntimeError", "AssertionError",
    "RecursionError", "MemoryError", "NameError", "UnboundLocalError", "LookupError",
    "UnicodeError", "UnicodeDecodeError", "UnicodeEncodeError", "FileNotFoundError", "OSError",
})


def _exception(name, text):
    """The candidate's exception as the built-in class of that name when it is one of
    ``_KEPT_EXCEPTIONS`` (tests that expect e.g. a ValueError still work), else RuntimeError."""
    import builtins

    cls = getattr(builtins, str(name), None) if str(name) in _KEPT_EXCEPTIONS else None
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    try:
        if cls is UnicodeDecodeError or cls is UnicodeEncodeError:
            cls = UnicodeError
        return cls(str(text))
    except BaseException:
        return RuntimeError(f"{name}: {text}")


def _module(name):
    """The judge's own copy of a module the solution imported (allow-listed modules only)."""
    if name not in _PRELOAD:
        return None
    try:
        __import__(name)
        return sys.modules[name]
    except Exception:
        return None


def _proxy(remote, name):
    def candidate(*args, **kwargs):
        return remote.call(name, args, kwargs)

    candidate.__name__ = candidate.__qualname__ = name
    return candidate


def _names(code):
    """Every global/attribute name a compiled module (and its nested code) refers to."""
    names, stack = set(), [code]
    while stack:
        co = stack.pop()
        names.update(co.co_names)
        stack.extend(c for c in co.co_consts if type(c) is type(code))
    return names


# Pure standard-library modules the judge imports before forking when the program or the tests
# name them: the solution process then finds them already loaded (``typing`` alone costs ~10 ms
# a process, and every HumanEval prompt imports it). Only modules without side effects.
_PRELOAD = frozenset({"typing", "math", "re", "collections", "itertools", "functools", "string",
                      "heapq", "bisect", "fractions", "decimal", "statistics", "hashlib", "copy",
                      "random", "operator", "json", "dataclasses", "enum"})


def _preload(*sources):
    for source in sources:
        for line in source.splitlines():
            words = line.replace(",", " ").split()
            if len(words) >= 2 and words[0] in ("import", "from"):
                for word in words[1:] if words[0] == "import" else words[1:2]:
                    name = word.split(".")[0]
                    if name in _PRELOAD and name not in sys.modules:
                        try:
                            __import__(name)
                        except Exception:
                            pass


def _read_block(fd):
    """One length-prefixed marshal block read from ``fd`` without reading past it."""
    return marshal.loads(_read_exact(fd, int.from_bytes(_read_exact(fd, 8), "big")))


def _start_solution(code, lim):
    """Fork the solution process; it keeps only its pipe ends, stderr and /dev/null."""
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)  # the rest of stdin (tests, nonce) stays out of reach
            os.dup2(2, 1)  # nor the report channel: prints go to stderr
            for fd in (null, req_w, resp_r):
                os.close(fd)
            _limit_nproc(lim)
            solution_main(code, req_r, resp_w)
        finally:
            os._exit(127)
    os.close(req_r)
    os.close(resp_w)
    return _Remote(pid, req_w, resp_r)


def _make_dumpable_never():
    """PR_SET_DUMPABLE 0: same-uid processes cannot ptrace the judge, read its memory or open
    /proc/<judge>/fd. Through ``_ctypes`` directly: importing ``ctypes`` costs ~7 ms a program."""
    try:
        import _ctypes

        prctl = _ctypes.dlsym(_ctypes.dlopen(None), "prctl")
        call = _ctypes.call_function
    except (ImportError, AttributeError, OSError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        call = lambda _, args: libc.prctl(*args)  # noqa: E731
        prctl = None
    call(prctl, (_PR_SET_DUMPABLE, 0, 0, 0, 0))
    if call(prctl, (_PR_GET_DUMPABLE, 0, 0, 0, 0)) != 0:
        raise OSError("prctl(PR_SET_DUMPABLE, 0) did not take effect")


# why: 81 lines: the judge's protocol is one linear script whose order (non-dumpable, first
# block, fork, then the tests and the nonce, then fd juggling) is the security argument of the
# module docstring, and every exit goes through `report`, a closure over os.write/os._exit bound
# before anything else runs; split into helpers, `report` would be passed around and the order
# would be harder to audit.
def judge_main():
    # Bind what the report needs before anything else runs.
    write, exit_now, flush_out, flush_err = (os.write, os._exit, sys.stdout.flush,
                                             sys.stderr.flush)
    status = {"nonce": None}

    def report(state, detail=""):
        for flush in (flush_out, flush_err):
            try:
                flush()
            except BaseException:
                pass
        if status["nonce"] is not None:  # before the nonce is read, nothing can be reported
            detail = "".join(" " if ch in "\t\r\n" else ch for ch in str(detail)[:300])
            line = f"{status['nonce']}\t{state}\t{detail}\n"
            write(status["fd"], line.encode("utf-8", "replace"))
        exit_now(0)

    _make_dumpable_never()  # before anything is read; raises (no report) if impossible
    first_block = _read_block(0)
    _preload(first_block["code"])
    _set_limits(first_block["limits"])
    try:
        remote = _start_solution(first_block["code"], first_block["limits"])
        _limit_nproc(first_block["limits"])
        problem = None
    except OSError as exc:
        problem = f"cannot start the solution process: {exc}"
    cfg = _read_block(0)
    status["nonce"], status["fd"] = cfg.pop("nonce"), os.dup(1)  # dup: not inheritable
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # prints go to stderr (capped by the host)
    if problem is not None:
        report("sandbox error", problem)
    try:
        tests = compile(cfg["tests"], "<tests>", "exec")
    except (SyntaxError, ValueError) as exc:
        report("bad tests", f"{type(exc).__name__} in tests: {str(exc)[:100]}")
    try:
        first = recv(remote.resp_r)
    except (EOFError, OSError):
        report(*remote.died())
    except BaseException:
        report("not plain data", "malformed reply from the solution process")
    if type(first) is tuple and first[:1] == ("error",) and len(first) == 3:
        report(str(first[1]), str(first[2]))
    if first != ("ready",):
        report("not plain data", "malformed reply from the solution process")
    del cfg
    import builtins

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        # never a builtin or a dunder (a plain dict sent as __builtins__ would become the
        # tests' builtins)
        wanted = sorted(n for n in _names(tests) if not hasattr(builtins, n)
                        and not (n.startswith("__") and n.endswith("__")))
        seen = remote.request(("names", wanted))
        if type(seen) is not dict:
            remote._fail("not plain data", "malformed reply from the solution process")
        for name, kind in seen.items():
            if name not in wanted or type(kind) is not tuple or not kind:
                continue
            if kind[0] == "f":
                namespace[name] = _proxy(remote, name)
            elif kind[0] == "v" and len(kind) == 2:
                namespace[name] = kind[1]
            elif kind[0] == "m" and len(kind) == 2:  # a module the solution imported:
                module = _module(str(kind[1]))  # the judge imports its own copy
                if module is not None:
                    namespace[name] = module
        exec(tests, namespace)
    except BaseException as exc:
        if remote.broken is not None:
            report(*remote.broken)
        report(*_classify(exc, "tests"))
    if remote.broken is not None:  # the tests swallowed a broken reply: still a failure
        report(*remote.broken)
    report("passed")


if __name__ == "__main__":
    judge_main()
