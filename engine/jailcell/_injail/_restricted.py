"""RestrictedPython mode, run inside a cell (stdlib + RestrictedPython only; imported by the zygote).

Code is compiled with RestrictedPython's policy and executed with guarded attribute, item,
write, iteration and unpacking hooks and a small set of safe builtins.  ``print`` goes to
stdout and the value of a final expression is returned, as in plain-Python mode.

On top of RestrictedPython's own checks, this module closes the gaps that have been
published against it: frame and generator internals (``gi_frame``, ``f_back``, ...),
``str.format``/``format_map`` attribute walks, ``AttributeError.obj`` leaks.
"""

from __future__ import annotations

import ast
import builtins
import sys

from RestrictedPython import compile_restricted_exec, safe_builtins
from RestrictedPython.Eval import default_guarded_getitem, default_guarded_getiter
from RestrictedPython.Guards import (
    full_write_guard,
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safer_getattr,
)

# Builtins of its own (as every in-jail module): a program that replaces builtins.len does not change
# what this code sees.
__builtins__ = dict(builtins.__dict__)  # type: ignore[assignment]

# Attribute names that reach interpreter internals: refused everywhere, whatever the object.
_FORBIDDEN_ATTRS = frozenset({
    "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code",
    "ag_await", "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "tb_frame", "tb_next",
    "__traceback__", "__context__", "__cause__", "obj", "format", "format_map", "mro", "__subclasses__",
    "__globals__", "__builtins__", "__code__", "__closure__", "__self__", "__func__", "__class__",
    "__bases__", "__base__", "__mro__", "__dict__", "__getattribute__", "__reduce__", "__reduce_ex__",
    # string.Formatter walks attributes with the real getattr (CVE-2023-41039)
    "Formatter", "vformat", "get_field", "get_value", "convert_field", "format_field",
})
RESULT_NAME = "jailcell_result_value"


class RestrictedViolation(Exception):
    """Code refused by the restricted mode (compile-time or run-time)."""

    jailcell_policy = True


# Which modules restricted code may import (set by run_restricted): attribute access reaches no
# other module either (``statistics.sys``, ``datetime.sys.modules['posix']``), nor a function or
# class that one defines.
_IMPORT_ALLOWED = [lambda name: False]
_MODULE = type(sys)


def _reaches_blocked_module(value) -> str | None:
    if isinstance(value, _MODULE):
        name = value.__name__
    else:
        name = getattr(type(value), "__module__", None) if not callable(value) else None  # type: ignore[assignment]
        if callable(value):
            try:
                name = object.__getattribute__(value, "__module__")
            except AttributeError:
                name = None
    if isinstance(name, str) and name not in ("builtins", "__main__") and not _IMPORT_ALLOWED[0](name):
        return name
    return None


def _getattr(obj, name, default=None, getattr=getattr):
    if not isinstance(name, str):
        raise TypeError("attribute name must be a string")
    if name.startswith("_") or name in _FORBIDDEN_ATTRS:
        raise RestrictedViolation(f"access to attribute {name!r} is not allowed in restricted mode")
    value = safer_getattr(obj, name, default) if default is not None else safer_getattr(obj, name)
    if isinstance(obj, _MODULE) or isinstance(value, _MODULE):
        blocked = _reaches_blocked_module(value)
        if blocked:
            raise RestrictedViolation(f"attribute {name!r} leads to module {blocked!r}, which restricted mode "
                                      "does not allow")
    return value


def _write(obj):
    """Allow attribute writes on instances of classes the restricted code defined itself."""
    kind = type(obj)
    if kind.__module__ == "__main__" and not isinstance(obj, type) and type(kind) is type:
        return obj
    return full_write_guard(obj)


def _safe_hasattr(obj, name):
    try:
        _getattr(obj, name)
        return True
    except (AttributeError, RestrictedViolation):
        return False


def _make_import(allowed):
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level != 0 or not allowed(name):
            raise RestrictedViolation(f"import of {name!r} is not allowed in restricted mode")
        module = real_import(name, globals, locals, fromlist, level)
        return module

    return guarded_import


class _Print:
    """RestrictedPython's ``_print_`` hook, writing straight to stdout."""

    def __init__(self, _getattr_=None):
        pass

    def _call_print(self, *objects, **kwargs):
        kwargs.pop("file", None)
        print(*objects, **kwargs)

    def __call__(self):
        return ""


def _check_syntax(code: str, filename: str) -> None:
    tree = ast.parse(code, filename, "exec")
    for node in ast.walk(tree):
        if isinstance(node, ast.TryStar):
            raise RestrictedViolation(f"line {node.lineno}: try/except* is not allowed in restricted mode")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                if arg.arg.startswith("_"):
                    raise RestrictedViolation(
                        f"line {node.lineno}: parameter names starting with '_' are not allowed in restricted mode"
                    )


def run_restricted(code: str, glb: dict, filename: str, import_allowed):
    """Compile and run ``code`` in restricted mode; return the last expression's value."""

    _check_syntax(code, filename)
    tree = ast.parse(code, filename, "exec")
    has_value = bool(tree.body) and isinstance(tree.body[-1], ast.Expr)
    if has_value:  # `expr` -> `jailcell_result_value = expr`, compiled with the rest (print works there)
        last = tree.body[-1]
        tree.body[-1] = ast.copy_location(
            ast.Assign(targets=[ast.Name(id=RESULT_NAME, ctx=ast.Store())], value=last.value), last)  # type: ignore[attr-defined]
        ast.fix_missing_locations(tree)
        code = ast.unparse(tree)
    compiled = compile_restricted_exec(code, filename)
    if compiled.errors:
        raise RestrictedViolation("; ".join(compiled.errors))
    _IMPORT_ALLOWED[0] = lambda name: import_allowed(name) or import_allowed(name.partition(".")[0]) \
        or name.startswith("_") and import_allowed(name.lstrip("_"))
    if not glb.get("__jailcell_restricted__"):
        rbuiltins = dict(safe_builtins)
        rbuiltins["__import__"] = _make_import(import_allowed)
        for name in ("sum", "min", "max", "any", "all", "enumerate", "map", "filter", "reversed",
                     "list", "dict", "set", "frozenset", "iter", "next"):
            rbuiltins[name] = getattr(builtins, name)
        rbuiltins["hasattr"] = _safe_hasattr
        rbuiltins["getattr"] = _getattr
        glb.update({
            "__builtins__": rbuiltins,
            "__metaclass__": type,
            "__jailcell_restricted__": True,
            "_getattr_": _getattr,
            "_getitem_": default_guarded_getitem,
            "_getiter_": default_guarded_getiter,
            "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
            "_unpack_sequence_": guarded_unpack_sequence,
            "_write_": _write,
            "_print_": _Print,
            "_inplacevar_": _inplacevar,
            "_apply_": lambda f, *a, **k: f(*a, **k),
        })
    glb.pop(RESULT_NAME, None)
    exec(compiled.code, glb)  # type: ignore[arg-type]
    return glb.pop(RESULT_NAME, None) if has_value else None


def _inplacevar(op, x, y):
    ops = {"+=": lambda: x + y, "-=": lambda: x - y, "*=": lambda: x * y, "/=": lambda: x / y,
           "//=": lambda: x // y, "%=": lambda: x % y, "**=": lambda: x ** y, "|=": lambda: x | y,
           "&=": lambda: x & y, "^=": lambda: x ^ y, "<<=": lambda: x << y, ">>=": lambda: x >> y}
    if op not in ops:
        raise RestrictedViolation(f"operator {op} is not allowed in restricted mode")
    return ops[op]()


_ = sys  # keep the import: the module is loaded before any user code
