"""Restricted mode (RestrictedPython) refuses the published escapes and common pyjail techniques,
and still runs ordinary computations.  Defence in depth: the OS jail remains the boundary
(tests/security/test_hostile.py runs hostile programs with no Python-level filter at all)."""

import pytest

from jailcell import Sandbox


@pytest.fixture(scope="module")
def restricted():
    with Sandbox("restricted", warm=True) as sb:
        yield sb


@pytest.mark.parametrize("code, expected", [
    ("print(1 + 1)", ("ok", None, "2\n")),
    ("x = [3, 1, 2]\nx.sort()\nx", ("ok", "[1, 2, 3]", "")),
    ("import math\nmath.sqrt(16)", ("ok", "4.0", "")),
    ("import json\njson.dumps({'a': [1, 2]})", ("ok", "'{\"a\": [1, 2]}'", "")),
    ("class A:\n    def __init__(self):\n        self.v = 3\nA().v", ("ok", "3", "")),
    ("def gen():\n    yield 1\n[v for v in gen()]", ("ok", "[1]", "")),
    ("for i, j in [(1, 2)]:\n    print(i, j)", ("ok", None, "1 2\n")),
    ("x = 5\nx += 2\nx", ("ok", "7", "")),
])
def test_ordinary_code_works(restricted, code, expected):
    r = restricted.run(code)
    assert (r.status, r.result, r.stdout) == expected, r


@pytest.mark.parametrize("name, code", [
    # CVE-2023-37271: stack frames through generators / coroutines, then f_back/f_globals
    ("cve-2023-37271 gi_frame", "def g():\n    yield 1\nx = g()\nx.gi_frame.f_back.f_globals"),
    ("cve-2023-37271 cr_frame", "async def c():\n    pass\nc().cr_frame"),
    ("cve-2023-37271 ag_frame", "async def a():\n    yield 1\na().ag_frame"),
    ("tb_frame", "try:\n    1/0\nexcept Exception as e:\n    e.__traceback__.tb_frame"),
    # CVE-2023-41039: attribute walks inside format strings
    ("cve-2023-41039 str.format", "'{0.__class__.__base__}'.format(1)"),
    ("cve-2023-41039 format_map", "'{x.__class__}'.format_map({'x': 1})"),
    ("cve-2023-41039 Formatter", "import string\nstring.Formatter().vformat('{0.__class__}', [1], {})"),
    # CVE-2024-47532: AttributeError.obj leaks the object behind a failed access
    ("cve-2024-47532 obj", "e = None\ntry:\n    {}.x\nexcept AttributeError as err:\n    e = err\ne.obj"),
    # CVE-2025-22153: try/except* type confusion
    ("cve-2025-22153 except*", "try:\n    pass\nexcept* ValueError:\n    pass"),
    # RestrictedPython 8.3: positional-only parameters shadowing the guard names
    ("posonly guard shadowing", "def f(_getattr_, /):\n    return _getattr_\nf(getattr)"),
    ("kwonly guard shadowing", "def f(*, _getiter_=None):\n    pass"),
    # classic pyjail techniques
    ("subclasses walk", "().__class__.__bases__[0].__subclasses__()"),
    ("mro walk", "type(1).mro()"),
    ("builtins via print.__self__", "print.__self__"),
    ("globals via function", "def f():\n    pass\nf.__globals__"),
    ("import os", "import os"),
    ("import sys (audit hooks, sys.modules)", "import sys\nsys.modules"),
    ("__import__", "__import__('os')"),
    ("getattr dunder", "getattr(1, '__class__')"),
    ("exec", "exec('import os')"),
    ("open", "open('/etc/hostname').read()"),
])
def test_escapes_refused(restricted, name, code):
    r = restricted.run(code)
    assert r.status in ("policy_violation", "error"), (name, r)
    assert r.result is None
    # refusals that jailcell itself makes are policy violations with a reason
    if r.status == "error":
        assert r.error["type"] in ("NameError", "SyntaxError", "TypeError", "AttributeError"), (name, r.error)


def test_compile_time_refusal_names_the_line(restricted):
    r = restricted.run("x = 1\ny = x.__class__")
    assert r.status == "policy_violation" and "Line 2" in r.error["message"]


@pytest.mark.parametrize("code", [
    "import statistics\nstatistics.sys.modules['posix']",
    "import datetime\ndatetime.sys",
    "import fractions\nfractions.sys.modules",
    "import random\nrandom.Random.seed",
])
def test_module_attributes_do_not_reach_other_modules(restricted, code):
    r = restricted.run(code)
    if code.endswith("seed"):  # a method of an allowed module's class: fine
        assert r.status == "ok", r
        return
    assert r.status == "policy_violation", r
    assert "restricted mode" in r.error["message"]
