"""The cell's code is split into body + final expression without an AST when the text allows it;
whatever path it takes, the result is the AST split's, to the line numbers of tracebacks."""

import ast
import contextlib
import io
import re
import sys
import traceback
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "engine" / "jailcell" / "_injail"))
import _cell  # noqa: E402  (the in-jail module, imported by file as the zygote does)

CASES = [
    "print(1)", "1", "x = 1\nx", "x = 1; x", "x = 1\nx\n", "x = 1\nx\n\n# c\n", "def f():\n    return 2\nf()",
    "if True:\n    3", "for i in range(3):\n    i\ni", "x = [1,\n2]\nx", "x = [1,\n2]", "f = lambda: (1,\n2)\nf()",
    "s = '''a\nb'''\ns", "s = '''\nx\n'''", "x = 1 + \\\n2\nx", "x = 1 + \\\n2", "@staticmethod\ndef g(): pass\ng",
    "try:\n    1/0\nexcept ZeroDivisionError:\n    pass\n5", "try:\n    1/0\nexcept ZeroDivisionError:\n    7",
    "x = 3\nx if x else \\\n 4", "x=1\n(x,\n x)", "x=1\n(x,\nx)", "x = 1\n  # indented comment\nx + 1",
    "class A:\n    pass\nA.__name__", "import math\nmath.pi", "1/0", "x = 1\n\n1/0", "def f(x: int): return x\nf.__annotations__",
    "a = 1\nb = 2\n\n\na + b  # trailing comment", "x = {\n'a': 1\n}\nx['a']", "'doc'", "'''multi\nline'''",
    "x = 1\nx.\\\nreal", "x = 5\n-x", "async def f(): pass\nf.__name__", "x = 1\r\nx\r\n", "x = 1\rx",
    "if 1:\n    pass\nelse:\n    2", "while False: pass\nelse: 8", "x = 2\nx ** \\\n3", "v = [i for i in range(3)]\nv[\n1]",
    "print('a'); print('b')", "x = 1\nprint(x)\nx", "\n\n\n", "", "# only a comment", "x = 1\n\t\nx",
    "x=(1\n)\nx", "\ufeffx = 1\nx", "x = 1\n\x0cx", "match 1:\n    case 1:\n        9\n9", "x = 1\nx +",
    "def f():\n    raise ValueError(1)\n\n\nf()", "from __future__ import annotations\ndef f(x: int): pass\nf.__annotations__",
]


def _reference(code):
    tree = ast.parse(code)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), "<cell>", "eval", dont_inherit=True)
    return compile(tree, "<cell>", "exec", dont_inherit=True), last


def _outcome(split):
    try:
        body, last = split()
    except SyntaxError as exc:
        return "SyntaxError", exc.msg, exc.lineno
    glb, out = {"__name__": "__main__"}, io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(body, glb)
            value = repr(eval(last, glb)) if last is not None else None
    except Exception as exc:  # noqa: BLE001
        value = f"{type(exc).__name__} at line {traceback.extract_tb(exc.__traceback__)[-1].lineno}"
    glb.pop("__builtins__", None)
    return re.sub(r" at 0x[0-9a-f]+", "", str(value)), out.getvalue(), sorted(glb), last is None


@pytest.mark.parametrize("code", CASES)
def test_split_matches_the_ast_split(code):
    assert _outcome(lambda: _cell.compile_cell(code)) == _outcome(lambda: _reference(code))


def test_the_common_endings_take_the_text_path(monkeypatch):
    calls = []
    real = compile

    def spy(source, *args, **kwargs):
        calls.append(not isinstance(source, str) or (len(args) > 2 and args[2] & ast.PyCF_ONLY_AST))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(_cell, "compile", spy, raising=False)
    for code in ("print(1)", "import math\nx = math.sqrt(4)\nprint(x)", "def f():\n    return 1\n\nf()\n"):
        calls.clear()
        _cell.compile_cell(code)
        assert calls == [False, False], (code, calls)  # two compiles of text, no AST
    calls.clear()
    _cell.compile_cell("x = 1; x")  # the last line holds two statements: the AST decides
    assert any(calls)


def test_the_program_does_not_inherit_jailcells_future_flags():
    body, last = _cell.compile_cell("def f(x: int): pass\nf.__annotations__")
    glb = {}
    exec(body, glb)
    assert eval(last, glb) == {"x": int}  # not {'x': 'int'}: _cell itself uses `from __future__ import annotations`
