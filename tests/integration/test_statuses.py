"""Every status is reachable and means what it says (real nsjail, no mocks)."""

import base64
import subprocess
import sys
import time

import pytest

from jailcell import InputError, Sandbox


def test_ok_stdout_stderr_and_last_expression(standard):
    r = standard.run("import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7")
    assert r.status == "ok" and r.ok
    assert r.stdout == "out\n" and r.stderr == "err\n" and r.result == "42"
    assert r.duration_s > 0 and r.cpu_s >= 0 and r.peak_memory_bytes > 0
    assert r.isolation["backend"] == "nsjail"


def test_cpu_time_and_peak_memory_are_measured(standard):
    r = standard.run("import time\nt = time.process_time()\nx = bytearray(64 * 1024 * 1024)\n"
                     "while time.process_time() - t < 0.3: pass")
    assert r.ok and 0.29 <= r.cpu_s < 5, r.cpu_s
    assert r.peak_memory_bytes >= 64 * 1024 * 1024


def test_none_result_and_statement_end(standard):
    assert standard.run("x = 1").result is None
    assert standard.run("None").result is None
    assert standard.run("'a' + 'b'").result == "'ab'"
    assert standard.run("x = 1; x + 1").result == "2"
    assert standard.run("x = [1,\n2]\n(len(x),\nsum(x))").result == "(2, 3)"
    assert standard.run("for i in range(3):\n    i").result is None  # the last statement is a loop


def test_the_program_is_compiled_without_jailcells_future_flags(standard):
    # jailcell's own modules use `from __future__ import annotations`; the program must not inherit it
    r = standard.run("def f(x: int) -> str: pass\nf.__annotations__")
    assert r.result == "{'x': <class 'int'>, 'return': <class 'str'>}", r


def test_a_broken_repr_of_the_last_expression_is_reported_not_raised(standard):
    r = standard.run("class A:\n    def __repr__(self):\n        raise ValueError('no')\nA()")
    assert r.ok and r.result == "<repr failed: ValueError: no>"
    # a result too large to show within the memory limit is the run's memory limit, not an "ok"
    r = standard.run("class B:\n    def __repr__(self):\n        raise MemoryError\nB()")
    assert r.status == "memory_limit" and r.error["type"] == "MemoryError" and r.result is None, r


def test_error_has_type_message_and_user_only_traceback(standard):
    r = standard.run("def f():\n    return 1 / 0\nf()")
    assert r.status == "error"
    assert r.error["type"] == "ZeroDivisionError" and r.error["message"] == "division by zero"
    tb = r.error["traceback"]
    assert 'File "<cell>", line 2, in f' in tb and "return 1 / 0" in tb
    assert "zygote" not in tb and "jailcell" not in tb


def test_syntax_error_is_an_error_result(standard):
    r = standard.run("def broken(:\n  pass")
    assert r.status == "error" and r.error["type"] == "SyntaxError"


def test_sys_exit_codes(standard):
    assert standard.run("import sys; sys.exit(0)").status == "ok"
    r = standard.run("import sys; sys.exit(3)")
    assert r.status == "error" and r.error["type"] == "SystemExit" and r.error["message"] == "3"
    r = standard.run("import os; os._exit(4)")
    assert r.status == "error" and "code 4" in r.error["message"]


def test_timeout_loop_ends_within_a_second_of_the_limit(standard):
    t0 = time.monotonic()
    r = standard.run("while True: pass", timeout=1)
    elapsed = time.monotonic() - t0
    assert r.status == "timeout" and elapsed < 2.0
    assert "wall-clock" in r.error["message"] or "CPU" in r.error["message"]


def test_sleeping_program_times_out_on_wall_clock(standard):
    t0 = time.monotonic()
    r = standard.run("import time\nprint('before', flush=True)\ntime.sleep(60)", timeout=1)
    assert r.status == "timeout" and time.monotonic() - t0 < 2.0
    assert r.stdout == "before\n"  # output produced before the kill is kept


def test_cpu_limit_is_a_timeout():
    with Sandbox("minimal", cpu_s=1, timeout=20) as sb:
        t0 = time.monotonic()
        r = sb.run("while True: pass")
    assert r.status == "timeout" and "CPU" in r.error["message"] and time.monotonic() - t0 < 6


def test_memory_bomb_is_memory_limit_within_seconds():
    with Sandbox("standard", memory=128) as sb:
        t0 = time.monotonic()
        r = sb.run("x = []\nwhile True: x.append(bytearray(8 * 1024 * 1024))")
        assert r.status == "memory_limit", r
        assert time.monotonic() - t0 < 10
        assert sb.run("print('still fine')").stdout == "still fine\n"


def test_memory_error_is_memory_limit(standard):
    r = standard.run("raise MemoryError()")
    assert r.status == "memory_limit"


def test_output_flood_is_output_limit_with_head_kept():
    with Sandbox("standard", output_bytes=10_000) as sb:
        r = sb.run("print('A' * 5000)\nwhile True: print('B' * 1000)")
        assert r.status == "output_limit"
        assert r.stdout.startswith("A" * 5000) and len(r.stdout) + len(r.stderr) == 10_000
        r = sb.run("import sys; sys.stderr.write('E' * 50_000)")
        assert r.status == "output_limit" and r.stderr == "E" * 10_000


@pytest.mark.parametrize("code, signame", [
    ("import faulthandler; faulthandler._sigsegv()", "SIGSEGV"),
    ("import os; os.abort()", "SIGABRT"),
    ("import os; os.kill(os.getpid(), 9)", "SIGKILL"),
])
def test_signals_are_killed(standard, code, signame):
    r = standard.run(code)
    assert r.status == "killed" and signame in r.error["message"]


def test_policy_violation_names_module_and_policy(standard):
    r = standard.run("import socket")
    assert r.status == "policy_violation"
    assert "'socket'" in r.error["message"] and "'standard'" in r.error["message"]
    # user code may catch it like any ImportError
    r = standard.run("try:\n    import socket\nexcept ImportError:\n    print('no socket')")
    assert r.status == "ok" and r.stdout == "no socket\n"


def test_files_in_and_out(standard):
    r = standard.run(
        "data = open('in/data.txt').read()\nopen('out.txt', 'w').write(data.upper())\nlen(data)",
        files={"in/data.txt": b"hello"},
    )
    assert r.status == "ok" and r.result == "5"
    assert r.files == [{"name": "out.txt", "size": 5}]


def test_matplotlib_figure_is_png_output(standard):
    r = standard.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    assert r.status == "ok" and len(r.outputs) == 1
    out = r.outputs[0]
    assert out["mime_type"] == "image/png"
    assert base64.b64decode(out["data"]).startswith(b"\x89PNG\r\n\x1a\n")
    r = standard.run("import matplotlib.pyplot as plt\nfig = plt.figure()\nplt.plot([1])\nplt.figure(); plt.plot([2])")
    assert len(r.outputs) == 2  # figures left open are returned too


def test_numpy_pandas_work(standard):
    r = standard.run("import numpy as np, pandas as pd\ndf = pd.DataFrame({'a': np.arange(4)})\nint(df.a.sum())")
    assert r.status == "ok" and r.result == "6"


def test_result_to_dict_is_json_ready(standard):
    import json

    d = standard.run("1").to_dict()
    assert set(d) == {"status", "stdout", "stderr", "result", "error", "outputs", "files", "duration_s", "cpu_s",
                      "peak_memory_bytes", "isolation"}
    json.dumps(d)


def test_bad_input_raises_clear_errors(standard):
    with pytest.raises(InputError, match="NUL"):
        standard.run("print(1)\0")
    with pytest.raises(InputError, match="over the limit"):
        standard.run("#" * (5 * 1024 * 1024))
    with pytest.raises(InputError, match="UTF-8"):
        standard.run(b"\xff\xfe")
    with pytest.raises(InputError, match="relative"):
        standard.run("1", files={"../x": b""})
    with pytest.raises(InputError, match="timeout"):
        standard.run("1", timeout=-1)


def test_a_program_that_breaks_builtins_still_gets_its_report(standard):
    """jailcell's code in a cell has builtins of its own: a stateless program that replaces or
    clears the builtins gets its value, traceback and figures back, and the next run is clean."""
    breaker = "import builtins\nfor name in ('len', 'repr', 'str', 'isinstance', 'sorted', 'type', 'dict', 'list'):\n" \
              "    setattr(builtins, name, None)\n"
    r = standard.run(breaker + "print('out')\n6 * 7")
    assert r.status == "ok" and r.stdout == "out\n" and r.result == "42", r
    r = standard.run("import builtins\ndef f():\n    return 1 / 0\nbuiltins.__dict__.clear()\nf()")
    assert r.status == "error" and r.error["type"] == "ZeroDivisionError", r
    assert 'line 3, in f' in r.error["traceback"] and "return 1 / 0" in r.error["traceback"], r.error
    r = standard.run("import matplotlib.pyplot as plt\nplt.plot([1, 2])\n" + breaker + "'drawn'")
    assert r.ok and r.result == "'drawn'" and [o["mime_type"] for o in r.outputs] == ["image/png"], r
    assert standard.run("len([1, 2]), type(1).__name__").result == "(2, 'int')"


def test_stateless_runs_share_nothing(standard):
    first = standard.run(
        "import json, builtins, os\n"
        "json.dumps = lambda *a, **k: 'hacked'\n"
        "builtins.len = lambda x: -1\n"
        "os.environ['LEAK'] = '1'\n"
        "open('/tmp/leak', 'w').write('x')\n"
        "open('leak.txt', 'w').write('x')\n"
        "secret_global = 42\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    import time; time.sleep(30)\n"
        "print(child)\n"
    )
    assert first.status == "ok"
    child = int(first.stdout)
    second = standard.run(
        "import json, os\n"
        "print(json.dumps([1]), len([1, 2]), os.environ.get('LEAK'), os.path.exists('/tmp/leak'),\n"
        "      os.path.exists('leak.txt'), 'secret_global' in globals())\n"
        "import time\n"
        "for _ in range(400):  # killed before this run started; its teardown may take a moment\n"
        f"    if not os.path.exists('/proc/{child}'):\n"
        "        break\n"
        "    time.sleep(0.005)\n"
        f"print(os.path.exists('/proc/{child}'))"
    )
    lines = second.stdout.splitlines()
    assert lines[0] == "[1] 2 None False False False"
    assert lines[1] == "False"  # the sleeping child of the first run is gone


def test_policy_env_reaches_the_jails_interpreter(tmp_path):
    """A policy's [env] applies to the jail's Python itself, PYTHON* variables included (the
    zygote must not start with -I/-E, which would silently ignore them)."""
    path = tmp_path / "seeded.toml"
    path.write_text('name = "seeded"\nextends = "minimal"\n[imports]\nallow_add = ["sys"]\ndeny_remove = ["sys"]\n'
                    '[env]\nPYTHONHASHSEED = "0"\n')
    expected = subprocess.run([sys.executable, "-c", "print(hash('jailcell'))"], capture_output=True, text=True,
                              env={"PYTHONHASHSEED": "0"}, check=True).stdout.strip()
    # The allocator too: pymalloc (the default) unless a policy says PYTHONMALLOC=malloc.
    stats = "import sys\nsys._debugmallocstats()"
    with Sandbox(str(path)) as sb:
        assert sb.run("print(hash('jailcell'))").stdout.strip() == expected
        assert "Small block threshold" in sb.run(stats).stderr
    malloc = tmp_path / "malloc.toml"
    malloc.write_text('name = "malloc"\nextends = "standard"\n[env]\nPYTHONMALLOC = "malloc"\n')
    with Sandbox(str(malloc)) as sb:
        r = sb.run(stats)
        assert r.ok and "Small block threshold" not in r.stderr
