"""`jailcell run / check / policy` as a user types them (a real subprocess each time)."""

import json
import subprocess
import sys

import pytest


def jailcell(*args, input=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "jailcell", *args], input=input, capture_output=True,
                          timeout=timeout)


def test_run_code_prints_like_python():
    r = jailcell("run", "-c", "import sys; print('hi'); print('oops', file=sys.stderr)")
    assert r.returncode == 0 and r.stdout == b"hi\n" and r.stderr == b"oops\n"


def test_run_file_and_stdin(tmp_path):
    f = tmp_path / "prog.py"
    f.write_text("print(sum(range(5)))")
    assert jailcell("run", str(f)).stdout == b"10\n"
    assert jailcell("run", "-", input=b"print('from stdin')").stdout == b"from stdin\n"


def test_json_is_exactly_one_object():
    r = jailcell("run", "--json", "-c", "print('x')\n1/0")
    assert r.returncode == 1
    obj = json.loads(r.stdout)  # fails if anything else was printed
    assert obj["status"] == "error" and obj["stdout"] == "x\n" and obj["error"]["type"] == "ZeroDivisionError"
    assert obj["isolation"]["backend"] == "nsjail"


def test_not_ok_prints_traceback_and_status_line():
    r = jailcell("run", "--timeout", "1", "-c", "while True: pass")
    assert r.returncode == 1 and b"jailcell: timeout" in r.stderr
    r = jailcell("run", "-c", "raise KeyError('k')")
    assert r.returncode == 1 and b"KeyError: 'k'" in r.stderr and b"jailcell: error" in r.stderr


def test_memory_flag():
    r = jailcell("run", "--memory", "128", "--json", "-c", "x = bytearray(400 * 1024 * 1024)")
    assert r.returncode == 1 and json.loads(r.stdout)["status"] == "memory_limit"


@pytest.mark.parametrize("args, stdin, words", [
    (["run", "/no/such/file.py"], None, [b"no such file"]),
    (["run", "-c", ""], None, [b"empty"]),
    (["run", "-"], b"   \n", [b"empty"]),
    (["run", "-"], b"print(1)\0", [b"NUL"]),
    (["run", "-"], b"print('\xff')", [b"UTF-8"]),
    (["run", "-"], b"#" * (50 * 1024 * 1024), [b"over the limit", b"code_bytes"]),
    (["run", "--policy", "nope", "-c", "1"], None, [b"unknown policy 'nope'", b"standard"]),
    (["run", "--timeout", "abc", "-c", "1"], None, [b"invalid float"]),
    (["run", "--memory", "1", "-c", "1"], None, [b"memory", b"16"]),
    (["run"], None, [b"required"]),
    (["run", "-c", "1", "file.py"], None, [b"not allowed"]),
    (["frobnicate"], None, [b"invalid choice"]),
    (["serve", "--upstream", "http://127.0.0.1:9/v1", "--model-map", "qwen"], None, [b"NAME=UPSTREAM", b"'qwen'"]),
    (["serve", "--upstream", "127.0.0.1:9"], None, [b"http(s) URL"]),
    (["serve", "--upstream", "http://127.0.0.1:9/v1", "--log-level", "loud"], None, [b"invalid choice", b"debug"]),
], ids=["missing-file", "empty-c", "blank-stdin", "nul", "undecodable", "50MB", "bad-policy-name", "bad-timeout",
        "bad-memory", "no-source", "two-sources", "bad-command", "bad-model-map", "bad-upstream", "bad-log-level"])
def test_usage_errors_exit_2_without_traceback(args, stdin, words):
    r = jailcell(*args, input=stdin)
    assert r.returncode == 2, r
    assert b"Traceback" not in r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_bad_policy_file_exit_2(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[limits]\ntimeout = 3\n")
    r = jailcell("run", "--policy", str(p), "-c", "1")
    assert r.returncode == 2 and str(p).encode() in r.stderr and b"timeout" in r.stderr and b"wall_s" in r.stderr
    p.write_text("[limits\n")
    r = jailcell("run", "--policy", str(p), "-c", "1")
    assert r.returncode == 2 and b"not valid TOML" in r.stderr


def test_file_option_copies_into_workspace(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("a,b\n1,2\n")
    r = jailcell("run", "--file", f"in.csv={data}", "-c", "print(open('in.csv').read().split()[1])")
    assert r.stdout == b"1,2\n"
    assert jailcell("run", "--file", "../x=/etc/hostname", "-c", "1").returncode == 2


def test_check_reports_and_exits_0():
    r = jailcell("check")
    assert r.returncode == 0
    for feature in (b"nsjail binary", b"seccomp", b"network namespace", b"memory limit", b"cgroup v1", b"cgroup v2"):
        assert feature in r.stdout


def test_policy_list_and_show():
    r = jailcell("policy", "list")
    assert r.returncode == 0 and b"minimal" in r.stdout and b"restricted" in r.stdout
    r = jailcell("policy", "show", "restricted")
    assert r.returncode == 0 and b'mode = "restricted"' in r.stdout and b"wall_s = 10.0" in r.stdout


def test_help_explains():
    r = jailcell("--help")
    assert r.returncode == 0 and b"check" in r.stdout and b"examples" in r.stdout
    r = jailcell("run", "--help")
    assert b"exit status" in r.stdout and b"--json" in r.stdout


@pytest.mark.parametrize("args, wrong, right", [
    (["run", "--polcy", "minimal", "-c", "print(1)"], "--polcy", "--policy"),
    (["run", "--timout", "3", "-c", "print(1)"], "--timout", "--timeout"),
    (["serve", "--upstrem", "http://127.0.0.1:9/v1"], "--upstrem", "--upstream"),
])
def test_a_misspelled_option_is_named_with_the_right_one(args, wrong, right):
    r = jailcell(*args)
    assert r.returncode == 2 and r.stdout == b""
    err = r.stderr.decode()
    assert f"unknown option '{wrong}'" in err and f"did you mean {right}?" in err, err
    assert "not allowed with argument" not in err


def test_option_values_that_look_like_options_are_values():
    r = jailcell("run", "--policy", "minimal", "-c", "-1")
    assert r.returncode == 0, r.stderr


def test_limit_messages_say_how_to_raise_the_limit_and_the_error_is_said_once():
    # a sleeping program: the wall clock ends it, never the CPU limit (a spinning one could hit either)
    r = jailcell("run", "--policy", "minimal", "--timeout", "1", "-c", "import time\ntime.sleep(30)")
    err = r.stderr.decode()
    assert r.returncode == 1 and "wall-clock limit of 1 s reached (raise it:" in err and "--timeout" in err, err
    r = jailcell("run", "--policy", "minimal", "--memory", "64", "-c", "x = bytearray(1 << 30)")
    err = r.stderr.decode()
    assert r.returncode == 1 and "memory limit of 64 MiB" in err and "--memory" in err, err
    r = jailcell("run", "--policy", "minimal", "-c", "import os")
    err = r.stderr.decode()
    assert err.count("blocked by policy 'minimal'") == 1, err  # the traceback says it; the summary does not repeat
    assert " more (`jailcell policy show minimal`)" in err and ", ..." not in err
    assert err.rstrip().endswith("jailcell: policy_violation")


def test_help_lists_each_command_once():
    out = jailcell("--help").stdout.decode()
    for command in ("run", "repl", "check", "policy", "serve", "mcp", "bench"):
        lines = [line for line in out.splitlines() if line.strip().startswith(command + " ")]
        assert len(lines) == 1, (command, lines)


# -- jailcell repl -------------------------------------------------------------------------------

def test_repl_keeps_state_and_reports_errors_like_python():
    lines = ["x = 41", "x + 1", "print('hi')", "def f():", "    return 7", "", "f()", "import socket", "1/0", "x * 2"]
    r = jailcell("repl", "--policy", "standard", input=("\n".join(lines) + "\n").encode())
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["42", "hi", "7", "82"]
    err = r.stderr.decode()
    assert "blocked by policy 'standard'" in err and "ZeroDivisionError" in err


def test_repl_ctrl_c_stops_the_run_and_keeps_the_state_from_before_it():
    import os
    import signal
    import time

    # As from a shell: SIGINT at its default (an ignored one is inherited, and Python then keeps it ignored).
    proc = subprocess.Popen([sys.executable, "-m", "jailcell", "repl", "--policy", "minimal", "--timeout", "60"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write(b"x = 5\nprint('ready')\nwhile True: x = 6\n\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(1.0)  # the loop is running now
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        proc.stdin.write(b"print(x)\n")
        proc.stdin.close()
        assert proc.stdout.readline() == b"5\n"  # the spinning run (and its x = 6) was discarded
        assert time.monotonic() - t0 < 10
        assert proc.wait(30) == 0
        assert b"KeyboardInterrupt" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_repl_exit_and_a_bad_policy():
    r = jailcell("repl", "--policy", "minimal", input=b"print(1)\nexit()\nprint(2)\n")
    assert r.returncode == 0 and r.stdout == b"1\n"
    r = jailcell("repl", "--policy", "nope", input=b"")
    assert r.returncode == 2 and b"nope" in r.stderr
