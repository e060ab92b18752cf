"""The package's layers, read from the source: what runs in the jail imports only the standard
library and itself, the host reaches into it only for the shared protocol, no import runs back up
the layers, and no module grows past what a reader can hold."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "engine" / "jailcell"
INJAIL = PKG / "_injail"
MAX_LINES = 600

# Lower layers first; a module may import from its own layer and the ones before it.
LAYERS = [
    {"_injail", "_errors", "_values", "_result", "_threads", "_metrics", "_audit"},
    {"_policy", "_bridge"},
    {"backends"},
    {"_host"},
    {"_engine"},
    {"_sandbox"},
    {"_async"},
    {"_pool"},
    {"__init__"},
    {"_check", "_bench", "_repl", "integrations", "_cli", "_cli_services", "_daemon", "__main__", "benchmarks"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules(root: Path):
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path):
    """(absolute dotted name, level) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["jailcell", *path.relative_to(PKG).parent.parts]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
                if node.module is None:  # from . import x
                    for alias in node.names:
                        yield f"{mod}.{alias.name}"
                    continue
                yield mod
            else:
                yield node.module


def _top(dotted: str) -> str | None:
    """The layer key of a jailcell module (``jailcell._host._jail`` -> ``_host``), else None."""
    parts = dotted.split(".")
    if parts[0] != "jailcell":
        return None
    if len(parts) == 1 or not ((PKG / parts[1]).is_dir() or (PKG / f"{parts[1]}.py").is_file()):
        return "__init__"  # the package itself (``from . import __version__``)
    return parts[1]


@pytest.mark.parametrize("path", _modules(INJAIL), ids=lambda p: p.name)
def test_in_jail_code_imports_the_standard_library_and_itself_only(path):
    own = {p.stem for p in INJAIL.glob("*.py")}
    allowed = set(sys.stdlib_module_names) | own | ({"RestrictedPython"} if path.stem == "_restricted" else set())
    for name in _imports(path):
        assert name.split(".")[0] in allowed, f"{path.name} imports {name}: the jail mounts only {INJAIL.name}/"


@pytest.mark.parametrize("path", [p for p in _modules(INJAIL) if p.stem != "__init__"], ids=lambda p: p.name)
def test_in_jail_modules_keep_builtins_of_their_own(path):
    """Jail code runs in processes where a program may have replaced builtins (a session's holder is
    a former cell): each module looks builtins up in a copy made at import."""
    tree = ast.parse(path.read_text())
    assert any(isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__builtins__"
                                                     for t in node.targets) for node in tree.body), path.name


def test_the_host_reaches_into_the_jail_package_only_for_the_protocol():
    for path in _modules(PKG):
        if INJAIL in path.parents:
            continue
        for name in _imports(path):
            if name.startswith("jailcell._injail"):
                assert name in ("jailcell._injail", "jailcell._injail._protocol"), f"{path} imports {name}"


def test_no_import_runs_back_up_the_layers():
    for path in _modules(PKG):
        if INJAIL in path.parents:
            continue
        rel = path.relative_to(PKG)
        own = rel.parts[0].removesuffix(".py")
        for name in _imports(path):
            top = _top(name)
            if top is None or top == own:
                continue
            assert RANK[top] <= RANK[own], f"{rel} (layer {RANK[own]}) imports {name} (layer {RANK[top]})"


@pytest.mark.parametrize("path", _modules(PKG), ids=lambda p: str(p.relative_to(PKG)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PKG)} has {lines} lines; split it by concern (at most {MAX_LINES})"


def test_the_command_line_loads_nothing_of_the_engine_until_it_needs_it():
    """`jailcell run` with a daemon is a round trip: the CLI and the daemon's client import no engine
    module (and none of asyncio, threading, dataclasses, subprocess), nor does `import jailcell`."""
    import subprocess
    import sys

    script = ("import sys, jailcell, jailcell._cli, jailcell._daemon; jailcell._cli.build_parser('run'); "
              "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, check=True,
                                env={"PYTHONPATH": str(PKG.parent)}).stdout.split())
    heavy = {"asyncio", "threading", "dataclasses", "subprocess", "typing", "pathlib", "tomllib", "logging", "socket",
             "importlib.metadata", "inspect"}
    ours = {m for m in loaded if m.startswith("jailcell.")}
    assert ours == {"jailcell._cli", "jailcell._daemon", "jailcell._errors"}, ours
    assert not heavy & loaded, heavy & loaded


def test_a_run_without_a_daemon_imports_no_dataclasses_or_asyncio():
    """`jailcell run` without a daemon imports the engine, but nothing that costs every call
    milliseconds for what the run does not use: dataclasses (and the inspect it imports), asyncio,
    logging, tempfile and shutil (bz2, lzma), json (the protocol uses the C accelerator).  The value
    classes are ``_values`` ones for this reason."""
    import subprocess
    import sys

    script = ("import sys, jailcell._cli, jailcell._daemon, jailcell._policy, jailcell._sandbox, "
              "jailcell._host._teardown; print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, check=True,
                                env={"PYTHONPATH": str(PKG.parent)}).stdout.split())
    assert not {"dataclasses", "inspect", "asyncio", "logging", "importlib.metadata", "tempfile", "shutil", "json",
                "bz2", "lzma"} & loaded
