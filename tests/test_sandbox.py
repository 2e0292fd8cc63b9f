"""Hostile programs: each is contained within its limits, scores 0, and the host is unaffected."""

import logging
import os
import shutil
import socket
import time
import uuid

import pytest

from mopd.verifiers import Sandbox, SandboxLimits, SandboxUnavailable, verify
from mopd.verifiers.code_exec import verify_code

NO_BWRAP = "bubblewrap (bwrap) not installed: apt-get install bubblewrap"
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason=NO_BWRAP)

LIMITS = SandboxLimits(wall_s=3.0, cpu_s=1, memory_bytes=256 << 20)
_CHILD_MARK = b"runs INSIDE the sandbox"  # text of the runner, present in every child's argv


@pytest.fixture(scope="module")
def box():
    if shutil.which("bwrap") is None:
        pytest.skip(NO_BWRAP)
    sandbox = Sandbox(LIMITS)
    assert sandbox.mode == "bwrap"  # bwrap installed but unusable must fail loudly, not skip
    return sandbox


def _sandbox_processes() -> int:
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                count += _CHILD_MARK in f.read()
        except OSError:
            pass
    return count


def _wait_no_sandbox_processes(timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    return _sandbox_processes()


def _run(box, code, tests="assert True"):
    verdict = verify_code(code, tests, box)
    assert verdict.reward == 0.0, verdict
    return verdict


def test_well_behaved_program_passes_and_fails(box):
    assert verify_code("def f(x):\n    return x + 1", "assert f(1) == 2", box).reward == 1.0
    v = verify_code("def f(x):\n    return x", "assert f(1) == 2", box)
    assert (v.reward, v.reason) == (0.0, "assertion failed")
    assert verify_code("def f(:\n", "assert True", box).reason.startswith("syntax error")


def test_runs_as_nobody_with_empty_environment(box, monkeypatch):
    monkeypatch.setenv("MOPD_TEST_SECRET", "hunter2-secret")
    code = ("import os, glob\n"
            "leaks = [k for k, v in os.environ.items() if 'hunter2' in v]\n"
            "for p in glob.glob('/proc/*/environ'):\n"
            "    try:\n        leaks += ['proc'] if b'hunter2' in open(p, 'rb').read() else []\n"
            "    except OSError:\n        pass\n"
            "uid = os.getuid()\n"
            "nnp = [l for l in open('/proc/self/status') if l.startswith('NoNewPrivs')]\n")
    tests = ("assert leaks == [], leaks\nassert uid == 65534, uid\n"
             "assert nnp == ['NoNewPrivs:\\t1\\n'], nnp")
    v = verify_code(code, tests, box)
    assert (v.reward, v.reason) == (1.0, "passed")
    res = box.run("import os\nprint(dict(os.environ))", "assert True")
    assert res.passed and "hunter2" not in res.output and "MOPD_TEST_SECRET" not in res.output


def test_infinite_loop_hits_cpu_limit(box):
    start = time.monotonic()
    v = _run(box, "while True:\n    pass")
    assert v.reason.startswith("timeout") and time.monotonic() - start < LIMITS.wall_s + 1.5


def test_sleeping_program_hits_wall_clock(box):
    start = time.monotonic()
    v = _run(box, "import time\ntime.sleep(60)")
    assert v.reason == f"timeout: wall clock {LIMITS.wall_s}s"
    assert time.monotonic() - start < LIMITS.wall_s + 1.5


def test_fork_bomb_is_capped_and_cleaned_up(box):
    v = _run(box, "import os\nwhile True:\n    os.fork()")
    assert "BlockingIOError" in v.reason or v.reason.startswith(("timeout", "killed"))
    assert _wait_no_sandbox_processes() == 0
    assert os.waitpid(os.fork() or os._exit(0), 0)[1] == 0  # the host can still fork


def test_huge_allocation_is_a_memory_error(box):
    v = _run(box, "x = bytearray(8 * 1024 ** 3)")
    assert v.reason == "memory: MemoryError in solution"


def test_deep_recursion(box):
    v = _run(box, "def r(n):\n    return r(n + 1)\nr(0)")
    assert v.reason == "recursion limit: RecursionError in solution"
    v = _run(box, "import sys\nsys.setrecursionlimit(10**8)\ndef r(n):\n    return r(n + 1)\nr(0)")
    assert v.reason.startswith(("timeout", "memory", "crashed", "recursion limit"))


def test_output_flood_is_capped(box):
    res = box.run("import sys\nsys.stdout.write('x' * 100_000_000)", "assert True")
    assert res.status == "output limit" and len(res.output) == LIMITS.output_bytes
    v = _run(box, "import sys\nsys.stdout.write('x' * 100_000_000)")
    assert v.reason.startswith("output limit")


def test_no_writes_outside_the_sandbox(box, tmp_path):
    targets = [tmp_path / f"escape-{uuid.uuid4().hex}", os.path.join(os.getcwd(), "PWNED-" +
               uuid.uuid4().hex), f"/usr/PWNED-{uuid.uuid4().hex}"]
    code = "\n".join(f"open({str(t)!r}, 'w').write('x')" for t in targets)
    v = _run(box, code)
    assert "FileNotFoundError" in v.reason or "Read-only" in v.reason
    shell = f"import os\nos.system('touch {targets[0]} {targets[1]}')\nx = 1"
    v = _run(box, shell, "assert x == 2")
    assert v.reason == "assertion failed"
    assert [os.path.exists(t) for t in targets] == [False, False, False]
    v = _run(box, "f = open('big', 'wb')\nf.write(b'x' * (64 << 20))")  # own dir is capped too
    assert "File too large" in v.reason or "No space" in v.reason


def test_no_network_to_a_host_listener(box):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        v = _run(box, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert "ConnectionRefusedError" in v.reason or "OSError" in v.reason
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()


def test_cannot_kill_the_parent(box):
    me = os.getpid()
    code = ("import os, signal\n"
            "for pid in (os.getppid(), %d, -1):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError:\n        pass\n"
            "os.killpg(0, signal.SIGKILL)\n" % me)
    v = _run(box, code)
    assert v.reason.startswith(("killed", "crashed", "exited early")), v.reason
    os.kill(me, 0)  # still alive (raises if not)
    assert verify_code("x = 1", "assert x == 1", box).reward == 1.0  # sandbox still works


def test_ctypes_segfault_and_early_exits(box):
    assert _run(box, "import ctypes\nctypes.string_at(0)").reason == "crashed: signal SIGSEGV"
    assert _run(box, "import os\nos._exit(0)").reason.startswith("exited early")
    assert _run(box, "import sys\nsys.exit(0)").reason == "exited early: SystemExit in solution"
    fake = 'import json, os\nprint(json.dumps({"status": "passed", "nonce": "0" * 32}))'
    assert _run(box, fake, "assert False").reason == "assertion failed"


def test_garbage_inputs_never_raise(box):
    for response in (b"\xff\xfe\x00garbage", "", "   ", None, 12, "x" * 500_000, "\x00\x00"):
        v = verify("code", response, "assert True")
        assert v.reward == 0.0 and v.reason


def test_refuses_without_bwrap_unless_allowed(monkeypatch, caplog):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("MOPD_ALLOW_UNSANDBOXED", raising=False)
    with pytest.raises(SandboxUnavailable, match="MOPD_ALLOW_UNSANDBOXED=1"):
        Sandbox(LIMITS).run("x = 1", "assert x == 1")
    monkeypatch.setenv("MOPD_ALLOW_UNSANDBOXED", "1")
    weak = Sandbox(LIMITS)
    with caplog.at_level(logging.WARNING, logger="mopd.verifiers.sandbox"):
        assert weak.mode == "unsandboxed"
    assert "UNSANDBOXED" in caplog.text
    monkeypatch.setenv("MOPD_TEST_SECRET", "hunter2-secret")
    assert weak.run("import os\nok = 'MOPD_TEST_SECRET' not in os.environ", "assert ok").passed
    assert weak.run("while True:\n    pass", "assert True").status == "timeout"
    assert weak.run("x = bytearray(8 * 1024 ** 3)", "assert True").status == "memory"
    assert Sandbox(LIMITS, allow_unsandboxed=True).mode == "unsandboxed"


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop to 65534 only happens as root")
def test_privilege_drop_without_setpriv(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which",
                        lambda name: None if name == "setpriv" else real_which(name))
    box = Sandbox(LIMITS)
    assert box.mode == "bwrap"
    res = box.run("import os\nids = (os.getuid(), os.getgid(), os.getgroups())",
                  "assert ids == (65534, 65534, []), ids")
    assert res.passed, res


def test_limits_validation():
    with pytest.raises(ValueError, match="SandboxLimits.wall_s must be > 0"):
        SandboxLimits(wall_s=0)
