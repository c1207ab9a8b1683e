"""Run a program under the kernel restrictions the systemd units ask for, as systemd would apply them.

    python deploy_hardened_exec.py ALLOWED_SYSCALLS_FILE -- PROGRAM ARGS...

- ``NoNewPrivileges=yes``: ``PR_SET_NO_NEW_PRIVS``;
- ``MemoryDenyWriteExecute=yes``: ``PR_SET_MDWE`` with ``PR_MDWE_REFUSE_EXEC_GAIN`` (Linux >= 6.3; what
  systemd uses where the kernel has it): no mapping may be writable and executable, none may become
  executable later;
- ``SystemCallFilter=@system-service`` + ``SystemCallFilter=~@privileged``: a seccomp allow list of the
  syscalls named in ALLOWED_SYSCALLS_FILE (one a line; the test expands the groups with
  ``systemd-analyze syscall-filter``); any other syscall kills the process with SIGSYS, as systemd does;
- ``RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX``: ``socket()`` of any other family fails with
  EAFNOSUPPORT, as systemd does.

Then it execs PROGRAM, which inherits all of it. Uses libseccomp (libseccomp2, a dependency of systemd).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_GE = 5


def SCMP_ACT_ERRNO(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def fail(message: str) -> None:
    print(f"deploy_hardened_exec: {message}", file=sys.stderr)
    sys.exit(126)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        fail("usage: deploy_hardened_exec.py ALLOWED_SYSCALLS_FILE -- PROGRAM ARGS...")
    allowed_file, program = argv[0], argv[2:]
    with open(allowed_file, encoding="ascii") as f:
        allowed = sorted({line.strip() for line in f if line.strip()})

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        fail(f"PR_SET_NO_NEW_PRIVS: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        fail(f"PR_SET_MDWE (needs Linux >= 6.3): {os.strerror(ctypes.get_errno())}")

    seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = seccomp.seccomp_init(SCMP_ACT_KILL_PROCESS)
    if not ctx:
        fail("seccomp_init failed")
    for name in allowed:
        nr = seccomp.seccomp_syscall_resolve_name(name.encode())
        if nr < 0 or name == "socket":  # unknown here (another architecture's), or restricted below
            continue
        rc = seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None)
        if rc != 0:
            fail(f"seccomp_rule_add({name}): {os.strerror(-rc)}")
    if "socket" in allowed:
        nr = seccomp.seccomp_syscall_resolve_name(b"socket")
        families = {socket.AF_UNIX, socket.AF_INET, socket.AF_INET6}
        for family in range(max(families) + 1):
            action = SCMP_ACT_ALLOW if family in families else SCMP_ACT_ERRNO(errno.EAFNOSUPPORT)
            cmp = ArgCmp(0, SCMP_CMP_EQ, family, 0)
            if seccomp.seccomp_rule_add_array(ctx, action, nr, 1, ctypes.byref(cmp)) != 0:
                fail(f"seccomp rule for socket family {family}")
        cmp = ArgCmp(0, SCMP_CMP_GE, max(families) + 1, 0)
        if (
            seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO(errno.EAFNOSUPPORT), nr, 1, ctypes.byref(cmp))
            != 0
        ):
            fail("seccomp rule for the other socket families")
    rc = seccomp.seccomp_load(ctx)
    if rc != 0:
        fail(f"seccomp_load: {os.strerror(-rc)}")
    os.execvp(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
