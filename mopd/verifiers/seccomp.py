"""A small seccomp deny-list for the code sandbox, as the classic-BPF program bwrap loads
(``--seccomp FD``).

Why: rlimits bound a process's address space and file sizes, but not kernel-held memory that
outlives a mapping (a System V shared-memory segment, detached, stays until its IPC namespace
dies; a ``memfd`` per descriptor; message queues), and not a few interfaces a test program never
needs (ptrace and cross-process memory access, io_uring, BPF, perf, keyrings, userfaultfd). These
calls fail with EPERM; everything else is allowed. Syscalls of a foreign ABI (i386 through
``int 0x80`` on x86_64, x32) are refused wholesale, so the deny-list cannot be bypassed through
another syscall table.

Supported: x86_64 and aarch64 (``filter_program()`` returns None elsewhere; the sandbox then runs
without it and says so once).
"""

from __future__ import annotations

import platform
import struct

# struct seccomp_data: int nr; __u32 arch; ...
_NR, _ARCH = 0, 4
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
_X32_BIT = 0x40000000

DENIED = ("shmget", "shmat", "shmctl", "msgget", "msgsnd", "semget", "mq_open", "memfd_create",
          "memfd_secret", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
          "kcmp", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf",
          "perf_event_open", "keyctl", "add_key", "request_key")

_ARCHES = {  # machine -> (AUDIT_ARCH_*, syscall numbers)
    "x86_64": (0xC000003E, {
        "shmget": 29, "shmat": 30, "shmctl": 31, "msgget": 68, "msgsnd": 69, "semget": 64,
        "mq_open": 240, "memfd_create": 319, "memfd_secret": 447, "ptrace": 101,
        "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438, "kcmp": 312,
        "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "bpf": 321, "perf_event_open": 298, "keyctl": 250,
        "add_key": 248, "request_key": 249}),
    "aarch64": (0xC00000B7, {
        "shmget": 194, "shmat": 196, "shmctl": 195, "msgget": 186, "msgsnd": 189, "semget": 190,
        "mq_open": 180, "memfd_create": 279, "memfd_secret": 447, "ptrace": 117,
        "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438, "kcmp": 272,
        "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "bpf": 280, "perf_event_open": 241, "keyctl": 219,
        "add_key": 217, "request_key": 218}),
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter, native byte order


def filter_program(machine: str | None = None) -> bytes | None:
    """The BPF program for this machine's architecture, or None if unsupported."""
    machine = machine or platform.machine()
    if machine in ("amd64", "AMD64"):
        machine = "x86_64"
    if machine in ("arm64",):
        machine = "aarch64"
    if machine not in _ARCHES:
        return None
    audit_arch, numbers = _ARCHES[machine]
    nrs = [numbers[name] for name in DENIED]
    # layout: 0 ld arch; 1 jeq arch; 2 ld nr; [3 jge x32 (x86_64)]; n x jeq nr; allow; deny
    checks = [_X32_BIT] if machine == "x86_64" else []
    body = len(checks) + len(nrs)
    deny = 3 + body + 1  # index of the deny instruction
    prog = [_insn(_LD_W_ABS, 0, 0, _ARCH),
            _insn(_JEQ_K, 0, deny - 2, audit_arch),  # foreign ABI -> deny
            _insn(_LD_W_ABS, 0, 0, _NR)]
    for value in checks:
        prog.append(_insn(_JGE_K, deny - len(prog) - 1, 0, value))
    for nr in nrs:
        prog.append(_insn(_JEQ_K, deny - len(prog) - 1, 0, nr))
    prog.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    prog.append(_insn(_RET_K, 0, 0, _RET_EPERM))
    assert len(prog) == deny + 1
    return b"".join(prog)
