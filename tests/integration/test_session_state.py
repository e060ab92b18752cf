"""A session keeps what one Python process would between runs: the program's open files (with their
offsets, which a killed run does not move), pipes, sqlite3 connections, and random's stream; what cannot
survive (threads) says so.  On every backend, through the gateway's containers and `jailcell repl` too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jailcell import Sandbox

from ..conftest import BACKENDS

DATA = bytes(range(100))


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(request):
    with Sandbox("standard", backend=request.param) as sb:
        yield sb


def ok(session, code, **kw):
    r = session.run(code, **kw)
    assert r.status == "ok", r
    return r


def test_a_file_opened_in_one_run_is_written_in_the_next(sandbox):
    """The issue's first snippet: no EBADF."""
    with sandbox.session() as s:
        ok(s, "g = open('log.txt', 'w')")
        ok(s, "g.write('line2'); g.flush()")
        assert s.download("log.txt") == b"line2"


def test_a_new_file_never_takes_the_descriptor_an_old_file_object_believes_it_owns(sandbox):
    """The issue's second snippet: writes meant for log.txt land in log.txt, other.txt stays empty."""
    with sandbox.session() as s:
        ok(s, "g = open('log.txt', 'w')")
        ok(s, "h = open('other.txt', 'w')\ng.write('MEANT-FOR-LOG'); g.flush()\nh.close()")
        assert s.download("log.txt") == b"MEANT-FOR-LOG" and s.download("other.txt") == b""
        ok(s, "import os\nfd = os.open('raw.txt', os.O_WRONLY | os.O_CREAT)")
        ok(s, "x = open('x.txt', 'w')\nos.write(fd, b'raw'); x.close()")  # os-level descriptors too
        assert s.download("raw.txt") == b"raw" and s.download("x.txt") == b""


def test_an_append_file_a_chunked_read_and_a_pipe_across_runs(sandbox):
    with sandbox.session() as s:
        s.upload("data.bin", DATA)
        ok(s, "log = open('log.txt', 'a')\nf = open('data.bin', 'rb')\nimport os\nr, w = os.pipe()")
        for i in range(3):
            ok(s, f"log.write('line {i}\\n'); log.flush()")
        chunks = [ok(s, "f.read(10)").result for _ in range(3)]
        assert chunks == [repr(DATA[i:i + 10]) for i in (0, 10, 20)]
        ok(s, "os.write(w, b'through the pipe')")
        assert ok(s, "os.read(r, 100)").result == "b'through the pipe'"
        assert s.download("log.txt") == b"line 0\nline 1\nline 2\n"


@pytest.mark.parametrize("buffering", ["0", "-1"])
def test_a_killed_run_does_not_move_the_offsets_of_the_state_it_returns_to(sandbox, buffering):
    with sandbox.session() as s:
        s.upload("data.bin", DATA)
        ok(s, f"f = open('data.bin', 'rb', buffering={buffering})")
        assert ok(s, "f.read(10)").result == repr(DATA[:10])
        killed = s.run("f.read(30)\nwhile True: pass", timeout=1)
        assert killed.status == "timeout"
        crashed = s.run("import os\nf.read(5)\nos.kill(os.getpid(), 9)")
        assert crashed.status == "killed"
        closed = s.run("f.close()\nimport os\nos.kill(os.getpid(), 9)")  # the state's descriptor stays open
        assert closed.status == "killed"
        assert ok(s, "f.read(10)").result == repr(DATA[10:20])


def test_sqlite3_connections_live_across_runs_and_a_killed_transaction_is_rolled_back(sandbox):
    with sandbox.session() as s:
        ok(s, "import sqlite3\ncon = sqlite3.connect('db.sqlite')\ncon.execute('create table t (x)')")
        ok(s, "con.execute('insert into t values (1)'); con.commit()")
        killed = s.run("con.execute('insert into t values (2)')\nwhile True: pass", timeout=1)
        assert killed.status == "timeout"
        ok(s, "con.execute('insert into t values (3)'); con.commit()")
        assert ok(s, "con.execute('select x from t order by x').fetchall()").result == "[(1,), (3,)]"


def test_random_continues_in_a_session_and_never_repeats_across_stateless_runs(sandbox):
    """CPython reseeds random in every forked child: a session puts its stream back, stateless runs
    keep fresh seeds."""
    with sandbox.session() as s:
        ok(s, "import random\nrandom.seed(1)")
        assert ok(s, "round(random.random(), 6)").result == "0.134364"
        assert ok(s, "round(random.random(), 6)").result == "0.847434"
        killed = s.run("random.random()\nwhile True: pass", timeout=1)
        assert killed.status == "timeout"
        assert ok(s, "round(random.random(), 6)").result == "0.763775"  # the killed run's draw did not count
        ok(s, "rng = random.Random(7)")
        assert ok(s, "rng.random()").result == repr(__import__("random").Random(7).random())
    draws = {sandbox.run("import random\nprint(random.random())").stdout for _ in range(5)}
    assert len(draws) == 5


def test_threads_do_not_survive_a_run_and_say_so(sandbox):
    with sandbox.session() as s:
        r = ok(s, "import threading, time\nt = threading.Thread(target=time.sleep, args=(30,), name='worker')\n"
                  "t.start()")
        assert "1 thread(s) still running when this run ended (worker)" in r.stderr
        joined = s.run("t.join()")
        assert joined.status == "error" and joined.error["type"] == "RuntimeError"
        assert "do not survive into the next run" in joined.error["message"]
        assert ok(s, "t.is_alive()").result == "False"


def test_forked_branches_read_a_shared_file_at_their_own_offsets(sandbox):
    with sandbox.session() as s:
        s.upload("data.bin", DATA)
        ok(s, "f = open('data.bin', 'rb', buffering=0)")
        with s.fork() as b:
            assert ok(b, "f.read(10)").result == repr(DATA[:10])
            assert ok(s, "f.read(10)").result == repr(DATA[:10])
            assert ok(b, "f.read(10)").result == repr(DATA[10:20])
            assert ok(s, "f.read(10)").result == repr(DATA[10:20])


def test_jailcells_own_descriptors_stay_out_of_the_programs_reach(sandbox):
    """The program's files are kept; nothing of jailcell's beyond what every cell has (its stdio, its
    result channel, its holder's socket) is open in a cell, however many runs kept files."""
    with sandbox.session() as s:
        ok(s, "kept = [open(f'k{i}.txt', 'w') for i in range(5)]")
        for _ in range(3):
            ok(s, "pass")
        r = ok(s, "import os, stat\n"
                  "mine = {k.fileno() for k in kept}\n"
                  "others = []\n"
                  "for fd in range(4, 256):\n"
                  "    try:\n"
                  "        mode = os.fstat(fd).st_mode\n"
                  "    except OSError:\n"
                  "        continue\n"
                  "    if fd not in mine:\n"
                  "        others.append(stat.S_IFMT(mode))\n"
                  "print(len(mine), sorted(others))")
        count, others = r.stdout.split(" ", 1)
        assert count == "5" and json.loads(others) == [stat_socket()], r.stdout  # the holder's socket only


def stat_socket() -> int:
    import stat

    return stat.S_IFSOCK


def test_the_repl_keeps_open_files_and_random_between_inputs(tmp_path):
    lines = ["import random, os", "random.seed(1)", "g = open('log.txt', 'w')", "h = open('other.txt', 'w')",
             "g.write('kept'); g.flush()", "print(open('log.txt').read(), repr(open('other.txt').read()))",
             "print(round(random.random(), 6))"]
    r = subprocess.run([sys.executable, "-m", "jailcell", "repl", "--policy", "standard"],
                       input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kept ''" in r.stdout and "0.134364" in r.stdout, r.stdout


def test_a_run_that_left_every_pid_taken_does_not_starve_the_next_runs_fork():
    """A finished run whose program forked until the jail had no pid left: its processes are killed by the
    sweep, and the next run's own fork() finds pids free (the holder reaps them before the next spare,
    not whenever it next forks)."""
    forks = ("import os, time\nn = 0\nfor _ in range(100):\n    try:\n        if os.fork() == 0:\n"
             "            time.sleep(30)\n            os._exit(0)\n        n += 1\n    except OSError:\n        break\nprint(n)")
    with Sandbox("standard", pids=16) as sb, sb.session() as s:
        for _ in range(5):
            r = s.run(forks)
            assert r.status == "ok" and int(r.stdout) >= 10, r
            after = s.run("import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\nprint('ok')")
            assert after.status == "ok" and after.stdout == "ok\n", after
