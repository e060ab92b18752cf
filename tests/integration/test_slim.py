"""Slim cells: a stateless jail whose policy preloads heavy packages (standard: numpy, pandas,
matplotlib) also forks cells from a slim image, taken before those were loaded.  A program that names
none of them runs in a slim cell; one that does gets a full cell; both are jailed alike."""

from __future__ import annotations

import psutil
import pytest

from jailcell import Policy, Sandbox

# What a cell has loaded, without naming a heavy package (a name would send it to a full cell).
LOADED = "import sys\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'nu' + 'mpy', 'pan' + 'das'}))"


def test_programs_that_name_no_heavy_package_run_in_slim_cells(standard):
    assert standard._jail.ready["slim"] == ["matplotlib", "numpy", "pandas"]
    assert standard.run(LOADED).stdout == "[]\n"
    assert standard.run("# numpy\n" + LOADED).stdout == "['numpy', 'pandas']\n"
    r = standard.run("import numpy as np\nint(np.arange(5).sum())")
    assert r.status == "ok" and r.result == "10"


def test_a_slim_cell_that_imports_a_heavy_package_anyway_still_works(standard):
    r = standard.run("import importlib\nm = importlib.import_module('nu' + 'mpy')\nprint(m.ones(3).sum())\n" + LOADED)
    assert r.status == "ok" and r.stdout == "3.0\n['numpy']\n", r.error


def test_slim_cells_keep_the_policy(standard):
    for code in ("import socket", "import subprocess", "import ctypes"):
        r = standard.run(code)
        assert r.status == "policy_violation", (code, r.status)
    r = standard.run("open('/proc/1/mem', 'rb').read(1)")  # the zygote's memory: not dumpable
    assert r.status == "error" and r.error["type"] == "PermissionError", r.error
    r = standard.run("open('/etc/passwd')")
    assert r.status == "error" and r.error["type"] == "FileNotFoundError"


def _nurseries(sb: Sandbox) -> list[psutil.Process]:
    """The zygote's children: its nurseries (cells are theirs)."""
    zygote = psutil.Process(sb._jail.pid).children()[0]
    return [c for c in zygote.children() if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_a_killed_slim_nursery_retires_its_jail_and_the_next_has_slim_cells_again():
    """A program that kills every process it can (the slim nursery among them) costs its jail: it is
    retired after that run (its slim image cannot be made again, and a jail under attack is not
    trusted), and later programs run in a new jail, in slim cells again, correctly and jailed."""
    with Sandbox("standard") as sb:
        assert sb.run("print(1)").stdout == "1\n"
        assert len(_nurseries(sb)) == 2
        jail = sb._jail
        r = sb.run("import os\nfor p in os.listdir('/proc'):\n    if p.isdigit() and int(p) != os.getpid():\n"
                   "        try: os.kill(int(p), 9)\n        except OSError: pass")
        assert r.status in ("ok", "killed"), r
        for _ in range(5):
            assert sb.run("print(2)").stdout == "2\n"
            assert sb.run("import numpy\nprint(numpy.int64(3))").stdout == "3\n"
            assert sb.run("import socket").status == "policy_violation"
        assert sb._jail is not jail
        assert sb.run(LOADED).stdout == "[]\n"  # a slim cell again
        assert len(_nurseries(sb)) == 2


def test_no_slim_image_where_it_would_not_help():
    with Sandbox("minimal") as sb:  # stdlib preloads only
        assert sb.run("print(1)").stdout == "1\n" and sb._jail.ready["slim"] is None
    with Sandbox("standard") as sb, sb.session() as s:  # a session keeps one image: its state
        assert s.run("x = 1").status == "ok" and s._shared.jail.ready["slim"] is None


@pytest.mark.parametrize("policy", ["standard"])
def test_the_pids_limit_is_the_policys_with_a_slim_nursery(policy):
    """The slim nursery's processes are the jail's, not the program's: a program still gets its
    policy's pids, and no more."""
    pids = 12
    p = Policy.load(policy).with_overrides(pids=pids)
    code = ("import os, time\nn = 0\ntry:\n    for _ in range(100):\n        if os.fork() == 0:\n"
            "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)")
    with Sandbox(p, timeout=20) as sb:
        r = sb.run(code)
        assert r.status == "ok", r
        assert pids - 2 <= int(r.stdout) <= pids, r.stdout
