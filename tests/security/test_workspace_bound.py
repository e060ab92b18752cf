"""The workspace's and TMPDIR's size bounds where they are no tmpfs of their own (the landlock backend):
the host watches the jail's folder during a run and stops a run that grows either past its bound.  Each
test tries to break the bound another way: one big write, many files under the file-size limit, writes
through a shared mapping (which inotify does not report), a child process, many empty files, a folder
whose modes were taken away, symbolic links to the host, deep and branched trees; and a session's
leftovers, which may be read and removed but not grown."""

from __future__ import annotations

import os

import pytest

from jailcell import InputError, Policy, Sandbox
from jailcell.backends import _disk

OPEN = Policy(name="open-files")
MIB = 1 << 20


@pytest.fixture(scope="module")
def small():
    with Sandbox(OPEN, backend="landlock", timeout=20, workspace_mib=8, tmp_mib=4, file_size_mib=64,
                 memory=256) as sb:
        yield sb


def _stopped(r, where="its workspace"):
    assert r.status == "error" and r.error["type"] == "WorkspaceFull", r
    assert where in r.error["message"], r.error


def _fresh(sb):
    """The next run starts from an empty workspace and TMPDIR (a stopped run burns no spare for good)."""
    r = sb.run("import os\nprint(os.listdir('.'), os.listdir(os.environ['TMPDIR']))")
    assert r.stdout == "[] []\n", r


def test_the_isolation_says_how_the_workspace_is_bounded(small):
    r = small.run("print(1)")
    assert r.ok and r.isolation["backend"] == "landlock"
    assert any("stops the run once either holds more than the policy allows" in d for d in r.isolation["degraded"])


def test_writes_within_the_bounds_are_untouched(small):
    r = small.run("import os\nopen('a', 'wb').write(b'x' * (6 << 20))\n"
                  "open(os.environ['TMPDIR'] + '/t', 'wb').write(b'y' * (3 << 20))\nprint(os.path.getsize('a'))")
    assert r.ok and r.stdout == f"{6 * MIB}\n", r


# Ways to grow the workspace or TMPDIR past its bound: (code, where the Result says it happened, a line
# the program prints only if it was not stopped in time -- asserted where the stop is surely first).
GROWTH = {
    "one big write": ("open('a', 'wb').write(b'x' * (20 << 20))\nprint('wrote it all')",
                      "its workspace", "wrote it all"),
    "many files under the file-size limit": (
        "for i in range(40):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\nprint('all forty')",
        "its workspace", "all forty"),
    "TMPDIR's own bound": (
        "import os\nfor i in range(8):\n    open(os.environ['TMPDIR'] + f'/{i}', 'wb').write(b'x' * (1 << 20))\n"
        "print('done')", "TMPDIR", None),
    # pages dirtied through mmap raise no inotify event: a sparse file counts at its size already
    "writes through a shared mapping": (
        "import mmap, time\nfor i in range(4):\n    f = open(f'm{i}', 'w+b')\n    f.truncate(3 << 20)\n"
        "    m = mmap.mmap(f.fileno(), 3 << 20)\n    m[:] = b'x' * (3 << 20)\n    m.flush()\n"
        "time.sleep(1)\nprint('mapped')", "its workspace", None),
    "a sparse file counts at its size": (
        "f = open('sparse', 'wb')\nf.truncate(12 << 20)\nf.close()\nimport time\ntime.sleep(1)\nprint('made')",
        "its workspace", None),
    "a child process that fills the workspace": (
        "import os, time\npid = os.fork()\nif pid == 0:\n    for i in range(40):\n"
        "        open(f'c{i}', 'wb').write(b'x' * (1 << 20))\n    os._exit(0)\ntime.sleep(3)\nprint('slept')",
        "its workspace", "slept"),
    "too many files": (
        "import os\nd = os.environ['TMPDIR']\nfor i in range(20000):\n    open(f'{d}/{i}', 'w').close()\n"
        "print('made')", "over 16384 files in TMPDIR", None),
    "a folder without modes is measured all the same": (
        "import os\nos.mkdir('hid')\nfor i in range(3):\n    open(f'hid/{i}', 'wb').write(b'x' * (3 << 20))\n"
        "os.chmod('hid', 0)\nopen('poke', 'w').close()\nimport time; time.sleep(0.5)\nprint('hidden')",
        "its workspace", None),
}


@pytest.mark.parametrize("attack", sorted(GROWTH))
def test_a_run_that_grows_past_the_bound_is_stopped(small, attack):
    code, where, unreached = GROWTH[attack]
    r = small.run(code)
    _stopped(r, where)
    if unreached:
        assert unreached not in r.stdout, r
    _fresh(small)


def test_links_to_the_host_are_not_followed(small):
    r = small.run("import os\nos.symlink('/', 'root')\nos.symlink('/usr', 'usr')\nos.mkdir('d')\n"
                  "os.symlink('..', 'd/up')\nopen('x', 'w').close()\nimport time; time.sleep(0.1)\nprint('linked')")
    assert r.ok and r.stdout == "linked\n", r
    r = small.run("import os\nopen('a', 'wb').write(b'x' * (5 << 20))\nos.link('a', 'b')\nos.link('a', 'c')\n"
                  "print('three names, one file')")
    assert r.ok, r  # hard links are counted once


def test_deep_chains_are_fine_and_deep_branched_trees_are_stopped(small):
    r = small.run("import os\nfor i in range(1500):\n    os.mkdir('a')\n    os.chdir('a')\n"
                  "open('f', 'wb').write(b'x' * 100)\nprint('deep')")
    assert r.ok and r.stdout == "deep\n", r
    r = small.run("import os\nfor i in range(150):\n    os.mkdir('b')\n    os.mkdir('a')\n    os.chdir('a')\n"
                  "print('branched')")
    _stopped(r, "levels deep")
    _fresh(small)


def test_a_session_may_read_and_remove_what_is_over_the_bound_but_not_grow_it(small):
    with small.session() as s:
        assert s.run("open('a', 'wb').write(b'x' * (7 << 20))\nx = 1").ok
        _stopped(s.run("open('b', 'wb').write(b'x' * (4 << 20))\nx = 2"))
        r = s.run("import os\nprint(sorted(os.listdir('.')), len(open('a', 'rb').read()) >> 20, x)")
        assert r.ok and r.stdout == "['a', 'b'] 7 1\n", r  # the stopped run's state is not kept; its files are
        _stopped(s.run("open('c', 'wb').write(b'x' * (1 << 20))"))
        r = s.run("import os\nos.remove('b')\nopen('c', 'wb').write(b'x' * (512 << 10))\nprint(x)")
        assert r.ok and r.stdout == "1\n", r
        with pytest.raises(InputError, match="No space left"):
            s.upload("more.bin", b"y" * (2 << 20))
        s.upload("fits.bin", b"y" * (256 << 10))
        assert s.run("print(x)").stdout == "1\n"


def test_without_inotify_watches_every_run_that_touches_files_is_scanned_on_the_timer(monkeypatch):
    monkeypatch.setattr(_disk, "MAX_WATCHES", 0)  # the user's watches used up
    with Sandbox(OPEN, backend="landlock", timeout=20, workspace_mib=8, file_size_mib=64) as sb:
        assert sb.run("open('a', 'wb').write(b'x' * (4 << 20))").ok
        _stopped(sb.run("for i in range(40):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\nprint('all')"))
        assert sb.run("print('next')").stdout == "next\n"


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """The jails' folders on a file system of 384 MiB of their own (a tmpfs mounted for the test)."""
    import subprocess
    import tempfile

    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384m,mode=0755", "jailcell-test-disk", str(mnt)], check=True)
    monkeypatch.setattr(tempfile, "tempdir", str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_files_unlinked_while_open_cannot_fill_the_host_disk(small_disk):
    """No scan sees a file the program unlinked while holding it open: what stops it is the backstop,
    the host's file system getting nearly full while the run writes."""
    code = ("import os, time\nkept = []\nfor i in range(40):\n    f = open(f'u{i}', 'wb')\n    os.unlink(f'u{i}')\n"
            "    f.write(b'x' * (8 << 20))\n    f.flush()\n    kept.append(f)\n    time.sleep(0.03)\n"
            "time.sleep(2)\nprint('kept', len(kept))")
    with Sandbox(OPEN, backend="landlock", timeout=30, workspace_mib=8, file_size_mib=64, memory=1024) as sb:
        r = sb.run(code)
        _stopped(r, "nearly full")
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        assert free > 200 * MIB, free  # given back: the run's processes are gone
        assert sb.run("print('next')").stdout == "next\n"
