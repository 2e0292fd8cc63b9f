"""Run model-written Python against test code in a throwaway sandbox.

Each program gets a fresh process tree inside bubblewrap (``bwrap``):

- new user, pid, network, ipc, uts, cgroup and mount namespaces (``--unshare-all``): no network
  (only a loopback with nothing on it), no view of host processes (the parent is not even
  visible), no nested user namespaces (``--disable-userns``), no capabilities;
- root filesystem = read-only binds of ``/usr`` (and ``/lib``, ``/bin``... as on the host) plus the
  interpreter's prefix; the root itself and ``/dev`` are remounted read-only, so the only
  writable place is a size-capped tmpfs (``/tmp``, the working directory) that vanishes with the
  sandbox: nothing is written on the host and no program holds more than ``tmpfs_bytes`` in files;
- uid/gid 65534 (nobody) inside; when the host process is root, bwrap itself is started as
  65534 too, so even an escape lands on an unprivileged user;
- empty environment (``--clearenv`` and an empty ``env=``): no inherited secrets;
- rlimits set by the in-sandbox runner before any model code runs: address space, CPU seconds,
  processes, file size, open files, no core dumps; the host enforces a wall-clock deadline and an
  output cap, and kills the whole sandbox (``--die-with-parent`` + pid namespace) on either.

Inside, the tests and the model's program run in two processes (see ``sandbox_child.py``): a
non-dumpable judge that holds the tests and the report channel, and a fresh interpreter for the
solution that answers calls with plain data. The verdict is computed where the solution cannot
reach it.

If bwrap is missing or unusable, running code raises :class:`SandboxUnavailable`, unless the
caller opts into the weaker mode (``allow_unsandboxed=True`` or ``MOPD_ALLOW_UNSANDBOXED=1``):
a plain subprocess with the same rlimits, empty environment, temporary working directory, new
session, and (as root) uid 65534 — but shared network and filesystem. A warning is logged.
"""

from __future__ import annotations

import logging
import marshal
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mopd.verifiers.seccomp import filter_program

logger = logging.getLogger(__name__)
_SECCOMP = filter_program()  # None on an architecture without a table (logged on first use)

NOBODY = 65534
# read as source and run inside the sandbox (mopd.codedeps: not an import)
__mopd_deps__ = ("mopd.verifiers.sandbox_child",)
RUNNER_SOURCE = (Path(__file__).parent / "sandbox_child.py").read_text(encoding="utf-8")
# The runner's code object (compiled once per interpreter, by that interpreter, outside the
# sandbox) arrives on stdin ahead of the payload: compiling its source costs ~3 ms a program.
BOOTSTRAP = ("# mopd code verifier: the runner that runs INSIDE the sandbox (sandbox_child.py)\n"
             "import marshal, os\n"
             "def _read(n):\n"
             "    b = b''\n"
             "    while len(b) < n:\n"
             "        c = os.read(0, n - len(b))\n"
             "        if not c:\n"
             "            raise EOFError\n"
             "        b += c\n"
             "    return b\n"
             "exec(marshal.loads(_read(int.from_bytes(_read(8), 'big'))))\n")
_COMPILE = ("import marshal, sys\n"
            "sys.stdout.buffer.write(marshal.dumps(compile(sys.stdin.read(), '<sandbox-runner>', "
            "'exec')))")
_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


class SandboxUnavailable(RuntimeError):
    """bwrap is missing or cannot start here, and unsandboxed execution was not allowed."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. ``memory_bytes`` is RLIMIT_AS (virtual address space) *per process*.

    ``nproc`` counts the sandbox's tasks (the judge, which is the pid namespace's init, the
    solution process, their threads and children), so 5 leaves room for three more. rlimits are per process, so
    one sandbox can hold up to about ``(nproc - 1) * memory_bytes + tmpfs_bytes`` of memory and
    ``verify_batch`` runs several sandboxes at once: bound the verifier with a container or
    cgroup memory limit when running untrusted code at scale.
    """

    wall_s: float = 5.0
    cpu_s: int = 3
    memory_bytes: int = 256 << 20
    nproc: int = 5
    file_bytes: int = 4 << 20
    tmpfs_bytes: int = 16 << 20
    nofile: int = 64
    output_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class RunResult:
    """Outcome of one program: ``status`` is "passed" or why not; ``output`` its (capped) output."""

    status: str
    detail: str = ""
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _allow_unsandboxed_from_env() -> bool:
    return os.environ.get("MOPD_ALLOW_UNSANDBOXED", "").strip().lower() in ("1", "true", "yes")


class Sandbox:
    """Runs ``tests`` against ``code``'s definitions in one sandbox; thread-safe.

    ``python``: interpreter to run inside (default: the first of $MOPD_SANDBOX_PYTHON, this
    interpreter's base executable, /usr/bin/python3 that works in the sandbox).
    """

    def __init__(self, limits: SandboxLimits | None = None, *,
                 allow_unsandboxed: bool | None = None, python: str | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.allow_unsandboxed = (_allow_unsandboxed_from_env() if allow_unsandboxed is None
                                  else allow_unsandboxed)
        self._python_choice = python
        self._mode: str | None = None  # "bwrap" | "unsandboxed", decided on first use
        self._python: str | None = None
        self._runner_code: dict[str, bytes | None] = {}  # interpreter -> marshalled runner
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        self._ensure_ready()
        assert self._mode is not None
        return self._mode

    def run(self, code: str, tests: str) -> RunResult:
        """Run ``code`` in the solution process and ``tests`` in the judge (``tests`` call the
        names ``code`` defines); never raises for anything the program does."""
        self._ensure_ready()
        return self._execute(code, tests, self._mode or "bwrap", self._python or "")

    # ------------------------------------------------------------------------------- set-up

    def _ensure_ready(self) -> None:
        with self._lock:
            if self._mode is None:
                self._mode, self._python = self._select_mode()

    def _candidates(self) -> list[str]:
        names = [self._python_choice, os.environ.get("MOPD_SANDBOX_PYTHON"),
                 getattr(sys, "_base_executable", None), sys.executable, "/usr/bin/python3",
                 shutil.which("python3")]
        seen, out = set(), []
        for name in names:
            if name and os.path.exists(name):
                real = os.path.realpath(name)
                if real not in seen:
                    seen.add(real)
                    out.append(real)
        return out

    def _probe(self, mode: str, problems: list[str]) -> str | None:
        """First candidate interpreter that runs a known-good program in ``mode``, or None."""
        for python in self._candidates():
            probe = self._execute("x = 6 * 7", "assert x == 42", mode, python)
            if probe.passed:
                return python
            problems.append(f"{mode} {python}: {probe.status} {probe.detail} {probe.output[-300:]}")
        return None

    def _select_mode(self) -> tuple[str, str]:
        problems: list[str] = []
        if shutil.which("bwrap") is None:
            problems.append("bwrap not found on PATH (apt-get install bubblewrap)")
        else:
            python = self._probe("bwrap", problems)
            if python is not None:
                logger.info("sandbox: bwrap with %s", python)
                if _SECCOMP is None:
                    logger.warning("sandbox: no seccomp table for this architecture; running "
                                   "without the syscall deny-list")
                return "bwrap", python
        message = "code sandbox unusable: " + "; ".join(problems)
        if not self.allow_unsandboxed:
            raise SandboxUnavailable(
                message + ". Refusing to run model-written code without it; set "
                "allow_unsandboxed=True or MOPD_ALLOW_UNSANDBOXED=1 to accept a weaker sandbox "
                "(rlimits and a clean environment, but shared network and filesystem)."
            )
        logger.warning("%s. RUNNING MODEL CODE UNSANDBOXED (allow_unsandboxed): rlimits and a "
                       "clean environment only; network and filesystem are shared.", message)
        python = self._probe("unsandboxed", problems)
        if python is None:
            raise SandboxUnavailable("no interpreter runs even unsandboxed: " + "; ".join(problems))
        return "unsandboxed", python

    # ------------------------------------------------------------------------------ running

    def _bwrap_argv(self, python: str) -> list[str]:
        argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user",
                "--disable-userns", "--die-with-parent", "--new-session", "--as-pid-1",
                "--cap-drop", "ALL",
                "--clearenv",
                "--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                argv += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                argv += ["--ro-bind", top, top]
        prefix = os.path.dirname(os.path.dirname(python))
        if not prefix.startswith("/usr/") and prefix != "/usr":
            argv += ["--ro-bind", prefix, prefix]
        # The root bwrap builds and its /dev are tmpfs mounts without a size cap: read-only.
        argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
                 "--size", str(self.limits.tmpfs_bytes), "--tmpfs", "/tmp",
                 "--remount-ro", "/",
                 "--uid", str(NOBODY), "--gid", str(NOBODY), "--chdir", "/tmp"]
        for key, value in _ENV.items():
            argv += ["--setenv", key, value]
        return argv + ["--", python, "-I", "-S", "-c", self._runner_argv(python)]

    def _runner_argv(self, python: str) -> str:
        """BOOTSTRAP when ``python`` compiled the runner for us, else the runner's source."""
        return BOOTSTRAP if self._compiled_runner(python) is not None else RUNNER_SOURCE

    def _compiled_runner(self, python: str) -> bytes | None:
        if python not in self._runner_code:
            try:
                done = subprocess.run([python, "-I", "-S", "-c", _COMPILE], input=RUNNER_SOURCE.encode(),
                                      capture_output=True, text=False, timeout=30, env=dict(_ENV),
                                      check=True)
                self._runner_code[python] = done.stdout or None
            except (OSError, subprocess.SubprocessError) as exc:
                logger.info("sandbox: %s cannot precompile the runner (%s); sending source",
                            python, exc)
                self._runner_code[python] = None
        return self._runner_code[python]

    def _execute(self, code: str, tests: str, mode: str, python: str) -> RunResult:
        nonce = secrets.token_hex(16)
        # Two blocks: the judge forks the solution process after reading the first one only.
        blocks = (marshal.dumps({"code": _clean(code), "limits": asdict(self.limits)}),
                  marshal.dumps({"tests": _clean(tests), "nonce": nonce}))
        runner = self._compiled_runner(python)
        payload = b"".join(len(b).to_bytes(8, "big") + b
                           for b in ((runner,) if runner is not None else ()) + blocks)
        as_nobody = os.geteuid() == 0
        workdir = None
        seccomp_fd = None
        if mode == "bwrap":
            argv, cwd = self._bwrap_argv(python), "/"
            if _SECCOMP is not None:  # a pipe holding the BPF program, read by bwrap
                seccomp_fd, write_end = os.pipe()
                os.write(write_end, _SECCOMP)
                os.close(write_end)
                at = argv.index("--")
                argv[at:at] = ["--seccomp", str(seccomp_fd)]
        else:
            workdir = tempfile.mkdtemp(prefix="mopd-sandbox-")
            if as_nobody:
                os.chown(workdir, NOBODY, NOBODY)
            argv, cwd = [python, "-I", "-S", "-c", self._runner_argv(python)], workdir
        argv, drop = _drop_privileges(argv) if as_nobody else (argv, {})
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=cwd, env=dict(_ENV, HOME=cwd), start_new_session=True, close_fds=True,
                pass_fds=() if seccomp_fd is None else (seccomp_fd,), **drop,
            )
        except OSError as exc:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            return RunResult("sandbox error", f"cannot start: {exc}")
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        try:
            return self._collect(proc, payload, nonce)
        finally:
            _kill_group(proc)
            try:
                proc.wait(timeout=5)  # normally already reaped by _collect; never leave a zombie
            except subprocess.TimeoutExpired:
                logger.error("sandbox process %d did not die after SIGKILL", proc.pid)
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)

    def _collect(self, proc: subprocess.Popen, payload: bytes, nonce: str) -> RunResult:
        """Feed the payload, read both pipes under the deadline and output cap, classify."""
        deadline = time.monotonic() + self.limits.wall_s
        status_buf, out_buf, over = _pump(proc, payload, deadline, self.limits.output_bytes)
        timed_out = time.monotonic() >= deadline
        if over or timed_out:
            _kill_group(proc)
        try:
            code = proc.wait(timeout=max(0.1, deadline + 1.0 - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = proc.wait()
        output = out_buf.decode("utf-8", "replace")
        report = _find_report(status_buf, nonce)
        if report is not None:
            return RunResult(report[0], report[1], output)
        if over:
            return RunResult("output limit", f"over {self.limits.output_bytes} bytes", output)
        if timed_out:
            return RunResult("timeout", f"wall clock {self.limits.wall_s}s", output)
        return RunResult(*_classify_exit(code), output)


def _drop_privileges(argv: list[str]) -> tuple[list[str], dict]:
    """Run ``argv`` as uid/gid 65534 with no supplementary groups and no new privileges.

    Through ``setpriv`` when present: Popen's own ``user=``/``group=`` forbid vfork, so the host
    would fork its whole address space per program (~30 ms with torch loaded, vs ~7 ms).
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                "--no-new-privs", "--", *argv], {}
    return argv, {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def _pump(proc: subprocess.Popen, payload: bytes, deadline: float,
          cap: int) -> tuple[bytes, bytes, bool]:
    """Write ``payload`` to stdin while reading stdout (runner status) and stderr (program
    output), all non-blocking, until EOF on both, the deadline, or ``cap`` bytes on one pipe.

    Returns (stdout, stderr capped at ``cap``, whether the cap was exceeded).
    """
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    view, stdin = memoryview(payload), proc.stdin
    os.set_blocking(stdin.fileno(), False)  # type: ignore[union-attr]
    with selectors.DefaultSelector() as sel:
        sel.register(stdin, selectors.EVENT_WRITE)
        for pipe in bufs:
            sel.register(pipe, selectors.EVENT_READ)
        while any(key.fileobj is not stdin for key in sel.get_map().values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in sel.select(timeout=remaining):
                if key.fileobj is stdin:
                    try:
                        view = view[os.write(key.fd, view[:65536]):]
                    except OSError:  # the program exited without reading: classified later
                        view = view[:0]
                    if not view:
                        sel.unregister(stdin)
                        stdin.close()  # type: ignore[union-attr]
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                bufs[key.fileobj] += chunk
                if len(bufs[key.fileobj]) > cap:
                    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr][:cap]), True
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), False


def _clean(text: str) -> str:
    """Text that encodes as UTF-8 (lone surrogates from odd decoders become U+FFFD)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _find_report(status_buf: bytes, nonce: str) -> tuple[str, str] | None:
    """``(status, detail)`` from the last ``nonce<TAB>status<TAB>detail`` line, or None."""
    for line in reversed(status_buf.decode("utf-8", "replace").splitlines()):
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[0] == nonce:
            return parts[1], parts[2]
    return None


def _classify_exit(code: int) -> tuple[str, str]:
    """Exit status without a runner report (bwrap reports a signal death as 128 + signal)."""
    signum = -code if code < 0 else code - 128 if code > 128 else 0
    if signum == signal.SIGXCPU:
        return "timeout", "cpu time limit"
    if signum == signal.SIGKILL:
        return "killed", "SIGKILL (memory or limit)"
    if signum > 0:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return "crashed", f"signal {name}"
    return "exited early", f"exit code {code} before the tests finished"


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's process group (bwrap's pid namespace dies with it).

    Also after the leader exited: in unsandboxed mode forked children may still hold the group.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            pipe.close()
