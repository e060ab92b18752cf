from pathlib import Path

import pytest

from jailcell import Policy, PolicyError
from jailcell._policy import builtin_policy_names


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtins_load_and_differ():
    assert {"minimal", "standard", "restricted"} <= set(builtin_policy_names())
    minimal, standard, restricted = (Policy.load(n) for n in ("minimal", "standard", "restricted"))
    assert standard.name == "standard" and "numpy" in standard.preload
    assert minimal.imports.blocks("os") and not minimal.imports.blocks("math")
    assert standard.imports.blocks("ctypes") and not standard.imports.blocks("numpy")
    assert restricted.code_mode == "restricted" and restricted.limits.wall_s == 10
    assert Policy.load() == standard  # the default


def test_import_globs():
    p = Policy.load("standard")
    assert p.imports.blocks("http.client") and p.imports.blocks("multiprocessing.pool")
    assert not p.imports.blocks("http") and not p.imports.blocks("json")


def test_extends_and_add_remove(tmp_path):
    path = write(tmp_path, '''
extends = "standard"
name = "mine"
[limits]
wall_s = 5
[imports]
deny_add = ["pickle"]
deny_remove = ["ctypes"]
[env]
FOO = "bar"
''')
    p = Policy.load(path)
    assert p.name == "mine" and p.limits.wall_s == 5 and p.limits.memory_mib == 512
    assert p.imports.blocks("pickle") and not p.imports.blocks("ctypes") and p.imports.blocks("socket")
    assert dict(p.env) == {"FOO": "bar"}
    child = write(tmp_path, f'extends = "{path.name}"\nname = "child"\n[env]\nBAR = "baz"\n', name="child.toml")
    assert dict(Policy.load(child).env) == {"FOO": "bar", "BAR": "baz"}  # the parent's [env] is inherited
    assert 'wall_s = 5.0' in p.to_toml()


def test_extends_relative_file_and_cycle(tmp_path):
    write(tmp_path, 'extends = "b.toml"\n', "a.toml")
    write(tmp_path, 'extends = "a.toml"\n', "b.toml")
    with pytest.raises(PolicyError, match="cycle"):
        Policy.load(tmp_path / "a.toml")


@pytest.mark.parametrize("text, words", [
    ("bogus = 1\n", ["bogus", "allowed"]),
    ("[limits]\nwall = 3\n", ["limits", "wall", "wall_s"]),
    ("[limits]\nwall_s = \"ten\"\n", ["limits.wall_s", "seconds"]),
    ("[limits]\nmemory_mib = 1\n", ["memory_mib", "16"]),
    ("[limits]\npids = true\n", ["pids", "integer"]),
    ("[network]\nenabled = \"no\"\n", ["network.enabled", "true or false"]),
    ("[code]\nmode = \"js\"\n", ["code.mode", "restricted"]),
    ("[imports]\ndeny = \"os\"\n", ["imports.deny", "list"]),
    ("[limits\n", ["not valid TOML"]),
    ("extends = \"nope\"\n", ["unknown policy", "standard"]),
])
def test_bad_policies_name_the_file_and_key(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    message = str(info.value)
    for word in words:
        assert word in message
    if "extends" not in text:
        assert str(path) in message


def test_unknown_name_and_missing_file():
    with pytest.raises(PolicyError, match="unknown policy 'huge'.*minimal"):
        Policy.load("huge")
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.load("/no/such/policy.toml")


def test_overrides():
    p = Policy.load("standard").with_overrides(timeout=2, memory=128, pids=8)
    assert (p.limits.wall_s, p.limits.memory_mib, p.limits.pids) == (2.0, 128, 8)
    with pytest.raises(PolicyError, match="unknown override 'speed'"):
        Policy.load("standard").with_overrides(speed=3)
    with pytest.raises(PolicyError, match="memory"):
        Policy.load("standard").with_overrides(memory=-5)


def test_undecodable_policy_file(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(PolicyError, match="UTF-8"):
        Policy.load(path)
