"""jailcell's own seccomp filter (the one every cell inherits), on its own: installed in a plain
process on the host, without nsjail's filter around it, so that each rule is proven by itself."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from jailcell.backends._base import JAIL_SRC

PROBE = r"""
import ctypes, errno, fcntl, json, mmap, os, sys
sys.path.insert(0, sys.argv[1])
import _seccomp
libc = ctypes.CDLL(None, use_errno=True)

def int80_getpid():
    # mov eax, 20 (getpid in the i386 table); int 0x80; ret
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])
    buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return ctypes.CFUNCTYPE(ctypes.c_int)(addr)()

def errno_of(call):
    ctypes.set_errno(0)
    rc = call()
    return 0 if rc >= 0 else ctypes.get_errno()

def probe():
    r, w = os.pipe()
    out = {
        "int80": int80_getpid(),
        "setown_group": errno_of(lambda: libc.fcntl(r, fcntl.F_SETOWN, -os.getpgid(0))),
        "setown_self": errno_of(lambda: libc.fcntl(r, fcntl.F_SETOWN, os.getpid())),
        "setown_ex": errno_of(lambda: libc.fcntl(r, 15, ctypes.c_char_p(b"\2\0\0\0\1\0\0\0"))),
        "fiosetown": errno_of(lambda: libc.ioctl(r, 0x8901, ctypes.byref(ctypes.c_int(-1)))),
        "siocspgrp": errno_of(lambda: libc.ioctl(r, 0x8902, ctypes.byref(ctypes.c_int(-1)))),
        "fionread": errno_of(lambda: libc.ioctl(r, 0x541B, ctypes.byref(ctypes.c_int(0)))),
        "setpgid_join": errno_of(lambda: libc.setpgid(0, os.getpgid(os.getppid()))),
        "setpgid_new": errno_of(lambda: libc.setpgid(0, 0)),
        "kill_group": errno_of(lambda: libc.kill(-os.getpgid(0), 0)),
        "kill_self": errno_of(lambda: libc.kill(os.getpid(), 0)),
        "ptrace": errno_of(lambda: libc.ptrace(16, os.getppid(), 0, 0)),  # PTRACE_ATTACH
        "process_vm_readv": errno_of(lambda: libc.syscall(310, os.getppid(), 0, 0, 0, 0, 0)),
        "pidfd_getfd": errno_of(lambda: libc.syscall(438, 0, 0, 0)),
        "io_uring_setup": errno_of(lambda: libc.syscall(425, 1, 0)),
        "dumpable_1": errno_of(lambda: libc.prctl(4, 1, 0, 0, 0)),
        "dumpable_0": errno_of(lambda: libc.prctl(4, 0, 0, 0, 0)),
    }
    os.close(r); os.close(w)
    return out

before = {"int80": int80_getpid(), "getpid": os.getpid()}  # nothing else unfiltered: ptrace would work
assert _seccomp.install()
print(json.dumps({"before": before, "after": probe()}))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the probe's machine code and numbers are x86_64's")
def test_the_cell_filter_rule_by_rule():
    out = subprocess.run([sys.executable, "-c", PROBE, str(JAIL_SRC)], capture_output=True, text=True, timeout=60,
                         process_group=0)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    before, after = data["before"], data["after"]
    eperm = 1
    # a system call of another architecture (int 0x80) works without the filter, and is denied with it
    assert before["int80"] == before["getpid"]
    assert after["int80"] == -eperm
    for name in ("setown_group", "setown_ex", "fiosetown", "siocspgrp", "setpgid_join", "kill_group", "ptrace",
                 "process_vm_readv", "pidfd_getfd", "io_uring_setup", "dumpable_1"):
        assert after[name] == eperm, (name, after[name])
    for name in ("setown_self", "fionread", "setpgid_new", "kill_self", "dumpable_0"):
        assert after[name] == 0, (name, after[name])
    assert os.getpid()  # (the probe ran in its own session: nothing of this process was touched)


UNSCOPED = r"""
import ctypes, json, os, sys
sys.path.insert(0, sys.argv[1])
import _seccomp
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
child = os.fork()
if child == 0:  # lives until the probe ends (EOF on the pipe), holding none of its output
    os.close(w)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.read(r, 1)
    os._exit(0)
os.close(r)

def errno_of(call):
    ctypes.set_errno(0)
    return 0 if call() >= 0 else ctypes.get_errno()

import tempfile
own_fd, own_path = tempfile.mkstemp(prefix="jailcell-filter-probe-")
os.unlink(own_path)
_seccomp.install_program(_seccomp.program(landlock=True, unscoped=True))
out = {
    "kill_child": errno_of(lambda: libc.kill(child, 0)),
    "kill_parent": errno_of(lambda: libc.kill(os.getppid(), 0)),
    "tgkill": errno_of(lambda: libc.syscall(234, child, child, 0)),
    "pidfd_open": errno_of(lambda: libc.syscall(434, child, 0)),
    "kill_own_group": errno_of(lambda: libc.kill(0, 0)),
    "chmod_path": errno_of(lambda: libc.chmod(b"/nonexistent-jailcell-probe", 0o700)),
    "utimensat_path": errno_of(lambda: libc.utimensat(-100, b"/nonexistent-jailcell-probe", None, 0)),
    "futimens": errno_of(lambda: libc.syscall(280, own_fd, None, None, 0)),
}
print(json.dumps(out))
os._exit(0)
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the probe's numbers are x86_64's")
def test_the_landlock_cells_filter_where_landlock_cannot_scope_signals():
    """ABI < 6 (before Linux 6.12) cannot keep a cell's signals inside its domain: there a cell may
    signal only its own process group -- no pid, no thread, no pidfd -- and never change metadata by path."""
    out = subprocess.run([sys.executable, "-c", UNSCOPED, str(JAIL_SRC)], capture_output=True, text=True, timeout=60,
                         process_group=0)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for name in ("kill_child", "kill_parent", "tgkill", "pidfd_open", "chmod_path", "utimensat_path"):
        assert data[name] == 1, (name, data)
    assert data["kill_own_group"] == 0 and data["futimens"] == 0, data
