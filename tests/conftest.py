"""Shared fixtures.  Every test session ends by asserting that nothing was left on the host."""

from __future__ import annotations

import gc
import glob
import os
import tempfile
import time
from pathlib import Path

import pytest

from jailcell import Policy, Sandbox
from jailcell.jail._host import close_all

REPO = Path(__file__).resolve().parent.parent


def jail_processes() -> list[int]:
    """Processes that belong to jailcell jails (nsjail or zygotes) anywhere on the host."""
    out = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            cmd = Path(d, "cmdline").read_bytes()
        except OSError:
            continue
        if b"jailcell/jail/zygote.py" in cmd or (b"nsjail" in cmd and b"jailcell" in cmd):
            out.append(int(d[6:]))
    return out


def jail_cgroups() -> list[str]:
    dirs = []
    for root in ("/sys/fs/cgroup/memory/jailcell", "/sys/fs/cgroup/pids/jailcell", "/sys/fs/cgroup/jailcell"):
        dirs += [p for p in glob.glob(f"{root}/*") if os.path.isdir(p) and os.path.basename(p).split("-")[0] == str(os.getpid())]
    return dirs


def jail_tmpdirs() -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), "jailcell-*"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    before_tmp = set(jail_tmpdirs())
    yield
    close_all()
    gc.collect()
    assert wait_for(lambda: not jail_processes()), f"jail processes left: {jail_processes()}"
    assert wait_for(lambda: not jail_cgroups()), f"cgroups left: {jail_cgroups()}"
    assert set(jail_tmpdirs()) <= before_tmp, f"temp dirs left: {set(jail_tmpdirs()) - before_tmp}"


@pytest.fixture(scope="session")
def standard():
    with Sandbox("standard", warm=True) as sb:
        yield sb


@pytest.fixture(scope="session")
def minimal():
    with Sandbox("minimal", warm=True) as sb:
        yield sb


OPEN_POLICY = Policy(name="open")  # no import rules: tests of the OS jail, not of the hook


@pytest.fixture(scope="session")
def open_sandbox():
    """A sandbox whose import policy allows everything: what the OS jail alone contains."""
    with Sandbox(OPEN_POLICY, warm=True, timeout=10, memory=256) as sb:
        yield sb
