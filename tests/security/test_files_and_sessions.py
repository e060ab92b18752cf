"""Files and sessions under hostile programs: special files, deep trees, full disks, sparse files,
symbolic-link tricks, and a host function that calls back into its own sandbox."""

from __future__ import annotations

import time

import pytest

from jailcell import InputError, Policy, Sandbox, UsageError

OPEN = Policy(name="open-files")


@pytest.fixture(scope="module")
def sb():
    with Sandbox(OPEN, timeout=20, memory=256) as sandbox:
        yield sandbox


def test_upload_onto_a_fifo_is_refused_at_once(sb):
    with sb.session() as s:
        s.run("import os\nos.mkfifo('inbox')\nx = 1")
        t0 = time.monotonic()
        with pytest.raises(InputError, match="not a regular file"):
            s.upload("inbox", b"data")
        assert time.monotonic() - t0 < 5
        s.upload("other.txt", b"data")  # the session lives on
        assert s.run("print(open('other.txt').read(), x)").stdout == "data 1\n"


def test_fork_copies_a_workspace_with_fifos_sockets_links_and_locked_dirs(sb):
    with sb.session() as s:
        r = s.run("import os, socket\nos.mkfifo('pipe')\nsk = socket.socket(socket.AF_UNIX)\nsk.bind('sock')\n"
                  "os.makedirs('d/e')\nopen('d/e/f', 'w').write('hi')\nos.chmod('d/e', 0o500)\nos.chmod('d', 0)\n"
                  "os.symlink('d/e/f', 'link')\nx = 7")
        assert r.ok, r
        branch = s.fork()
        out = branch.run("import os, stat\nos.chmod('d', 0o755)\n"
                         "print(sorted(os.listdir('.')), stat.S_ISFIFO(os.lstat('pipe').st_mode), "
                         "os.readlink('link'), open('link').read(), oct(os.stat('d/e').st_mode & 0o777), x)")
        assert out.stdout == "['d', 'link', 'pipe'] True d/e/f hi 0o500 7\n", out
        assert s.run("print(x)").stdout == "7\n"  # the parent session is untouched
        branch.close()


def test_deep_trees_are_swept_and_copied(sb):
    deep = "import os\nos.chdir(ROOT)\nfor i in range(DEPTH):\n    os.mkdir('a')\n    os.chdir('a')\nprint('made')"
    for _ in range(2):  # 3,000 levels in /tmp: past the recursion limit; the next run gets a clean /tmp
        r = sb.run(deep.replace("ROOT", "'/tmp'").replace("DEPTH", "3000"))
        assert r.stdout == "made\n", r
        assert sb.run("import os\nprint(os.listdir('/tmp'), os.listdir('.'))").stdout.startswith("[]")
    with sb.session() as s:
        assert s.run(deep.replace("ROOT", "'.'").replace("DEPTH", "1200") + "\nx = 3").ok
        assert s.fork().run("print(x)").stdout == "3\n"


def test_a_full_workspace_is_enospc_for_the_program_and_the_session_lives():
    with Sandbox(OPEN, timeout=20, workspace_mib=4, file_size_mib=64) as small:
        with small.session() as s:
            s.run("x = 1")
            r = s.run("try:\n    open('big', 'wb').write(b'x' * (16 << 20))\nexcept OSError as e:\n    print(e.errno)")
            assert r.stdout.strip() == "28", r  # ENOSPC
            assert s.run("import os\nos.remove('big')\nprint(x)").stdout == "1\n"


def test_sparse_and_oversized_files_hit_the_file_size_limit():
    with Sandbox(OPEN, timeout=20, file_size_mib=1) as small:
        r = small.run("import os\ntry:\n    f = open('sparse', 'wb')\n    f.truncate(1 << 40)\n    print('made')\n"
                      "except OSError as e:\n    print('refused', e.errno)")
        assert r.stdout.startswith("refused"), r
        r = small.run("open('big', 'wb').write(b'x' * (2 << 20))")
        assert r.status in ("error", "killed"), r  # EFBIG or SIGXFSZ, never a 2 MiB file
        assert small.run("print('next')").stdout == "next\n"


def test_symlink_tricks_do_not_reach_outside_the_workspace(sb):
    with sb.session() as s:
        s.run("import os\nos.symlink('/etc/passwd', 'p')\nos.symlink('loop', 'loop')\n"
              "os.symlink('..', 'up')\nos.symlink('.', 'self')")
        for name in ("p", "loop", "up/x", "self/p"):
            with pytest.raises(InputError):
                s.download(name)
        listed = s.run("open('real.txt', 'w').write('x')").files
        assert [f["name"] for f in listed] == ["real.txt"]


def test_no_dev_shm_and_no_host_devices(sb):
    r = sb.run("import os\nprint(sorted(os.listdir('/dev')), os.path.exists('/dev/shm'))")
    assert r.stdout == "['null', 'random', 'urandom', 'zero'] False\n", r


def test_a_host_function_that_runs_its_own_sandbox_gets_an_error_not_a_deadlock():
    box: dict = {}

    def again(code):
        try:
            return box["target"].run(code).stdout
        except UsageError as exc:
            return f"UsageError: {exc}"

    with Sandbox("minimal", functions={"again": again}, timeout=10) as sandbox:
        box["target"] = sandbox
        t0 = time.monotonic()
        r = sandbox.run("print(again('print(1)'))")
        assert r.ok and "UsageError: run() was called" in r.stdout, r
        with sandbox.session() as s:
            box["target"] = s
            assert "UsageError" in s.run("print(again('print(1)'))").stdout
        with Sandbox("minimal") as other:  # another sandbox is fine
            box["target"] = other
            assert sandbox.run("print(again('print(5)'), end='')").stdout == "5\n"
        assert time.monotonic() - t0 < 10


def test_files_as_large_as_the_policy_allows_travel_whole():
    """50 MiB (standard allows 64 MiB a file): in files= of a run, and uploaded to / downloaded from
    a session, in pieces under the protocol's frame limit."""
    import hashlib
    import os

    data = os.urandom(50 << 20)
    digest = hashlib.sha256(data).hexdigest()
    with Sandbox(OPEN, timeout=30, memory=512, file_size_mib=64, workspace_mib=256) as big:
        r = big.run("import hashlib\nprint(hashlib.sha256(open('in.bin', 'rb').read()).hexdigest())",
                    files={"in.bin": data})
        assert r.ok and r.stdout.strip() == digest, r
        assert big.run("print('next')").stdout == "next\n"  # no spare was burnt
        with big.session() as s:
            s.upload("up.bin", data)
            assert s.run("import os\nprint(os.path.getsize('up.bin'))").stdout == f"{len(data)}\n"
            assert s.download("up.bin") == data
            s.upload("empty.bin", b"")
            assert s.download("empty.bin") == b""


def test_an_upload_into_a_full_workspace_is_an_input_error_and_the_session_lives():
    with Sandbox(OPEN, timeout=20, workspace_mib=8, file_size_mib=8) as small:
        with small.session() as s:
            s.run("x = 1\nopen('filler', 'wb').write(b'x' * (6 << 20))")
            with pytest.raises(InputError, match="No space left"):
                s.upload("more.bin", b"y" * (5 << 20))
            assert s.run("print(x)").stdout == "1\n"
