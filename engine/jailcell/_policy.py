"""Policies: what a jail may do, declared in TOML and validated strictly.

A policy file looks like this (every key optional except in the built-ins)::

    name = "mine"
    description = "standard, plus requests to a local mirror"
    extends = "standard"            # a built-in name or a path relative to this file

    [limits]
    wall_s = 30                     # wall-clock seconds per run
    cpu_s = 30                      # CPU seconds per run (default: same as wall_s)
    memory_mib = 512                # memory a run may use on top of the warm interpreter
    pids = 64                       # processes + threads in the jail
    file_size_mib = 64              # largest file a run may write
    open_files = 256                # file descriptors per process
    output_bytes = 1048576          # stdout + stderr kept per run; more is output_limit
    workspace_mib = 256             # size of the writable workspace (cwd)
    tmp_mib = 64                    # size of /tmp
    code_bytes = 4194304            # largest program accepted

    [network]
    enabled = false

    [preload]
    modules = ["numpy", "pandas", "matplotlib.pyplot"]

    [imports]
    allow = []                      # globs; empty = everything not denied
    deny = ["ctypes", "socket"]
    allow_add = []                  # appended to the inherited lists
    deny_add = []
    allow_remove = []               # removed from the inherited lists
    deny_remove = []

    [code]
    mode = "python"                 # or "restricted" (RestrictedPython)

    [isolation]
    minimum = "landlock"            # the least a run accepts: "namespaces" (nsjail), "landlock"
                                    # (Landlock + seccomp) or "none" (also the process backend)

    [env]
    MY_VAR = "value"

Any unknown key, wrong type or out-of-range value raises :class:`PolicyError`
naming the file, the key and what is allowed.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from ._errors import PolicyError
from ._injail._protocol import blocked, matcher
from ._values import Frozen

__all__ = ["Policy", "Limits", "Imports", "builtin_policy_names", "policies_dir"]

MIB = 1024 * 1024


def policies_dir() -> Path:
    """Directory of the built-in policies: inside the wheel, or the repo root in editable installs."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "policies", here.parent.parent / "policies"):
        if candidate.is_dir():
            return candidate
    raise PolicyError(
        f"jailcell's built-in policies are missing (looked in {here / 'policies'}); reinstall jailcell"
    )


def builtin_policy_names() -> list[str]:
    return sorted(p.stem for p in policies_dir().glob("*.toml"))


class Limits(Frozen):
    """A policy's resource limits (the ``[limits]`` table).  Immutable; ``replace(**changes)`` derives one."""

    __slots__ = ("wall_s", "cpu_s", "memory_mib", "pids", "file_size_mib", "open_files", "output_bytes",
                 "workspace_mib", "tmp_mib", "code_bytes")
    wall_s: float
    cpu_s: float | None
    memory_mib: int
    pids: int
    file_size_mib: int
    open_files: int
    output_bytes: int
    workspace_mib: int
    tmp_mib: int
    code_bytes: int

    def __init__(self, wall_s: float = 30.0, cpu_s: float | None = None, memory_mib: int = 512, pids: int = 64,
                 file_size_mib: int = 64, open_files: int = 256, output_bytes: int = 1024 * 1024,
                 workspace_mib: int = 256, tmp_mib: int = 64, code_bytes: int = 4 * MIB) -> None:
        self._set(wall_s=wall_s, cpu_s=cpu_s, memory_mib=memory_mib, pids=pids, file_size_mib=file_size_mib,
                  open_files=open_files, output_bytes=output_bytes, workspace_mib=workspace_mib, tmp_mib=tmp_mib,
                  code_bytes=code_bytes)

    @property
    def effective_cpu_s(self) -> float:
        return self.cpu_s if self.cpu_s is not None else self.wall_s


# (type, minimum, maximum, description) for every limit; used for validation and messages.
_LIMIT_RULES: dict[str, tuple[type, float, float, str]] = {
    "wall_s": (float, 0.01, 86400, "seconds, 0.01 to 86400"),
    "cpu_s": (float, 0.01, 86400, "seconds, 0.01 to 86400"),
    "memory_mib": (int, 16, 1024 * 1024, "MiB, 16 to 1048576"),
    "pids": (int, 1, 32768, "an integer, 1 to 32768"),
    "file_size_mib": (int, 1, 1024 * 1024, "MiB, 1 to 1048576"),
    "open_files": (int, 16, 65536, "an integer, 16 to 65536"),
    "output_bytes": (int, 1024, 1024 * MIB, "bytes, 1024 to 1073741824"),
    "workspace_mib": (int, 1, 1024 * 1024, "MiB, 1 to 1048576"),
    "tmp_mib": (int, 1, 1024 * 1024, "MiB, 1 to 1048576"),
    "code_bytes": (int, 1, 256 * MIB, "bytes, 1 to 268435456"),
}


class Imports(Frozen):
    """A policy's import rules (the ``[imports]`` table): module patterns allowed and denied."""

    __slots__ = ("allow", "deny")
    allow: tuple[str, ...]
    deny: tuple[str, ...]

    def __init__(self, allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> None:
        self._set(allow=allow, deny=deny)

    def blocks(self, module: str) -> bool:
        """True if an import of ``module`` by user code is refused (the rule the jail applies:
        ``_injail/_protocol.py``)."""
        return blocked(module, matcher(self.deny), matcher(self.allow))


CODE_MODES = ("python", "restricted")
# The isolation a policy accepts at least, weakest first; each backend gives one of them.
ISOLATION_LEVELS = ("none", "landlock", "namespaces")
BACKEND_LEVEL = {"process": "none", "landlock": "landlock", "nsjail": "namespaces"}
_TOP_KEYS = {"name", "description", "extends", "limits", "network", "preload", "imports", "code", "env", "isolation"}
_SECTION_KEYS = {
    "isolation": {"minimum"},
    "network": {"enabled"},
    "preload": {"modules"},
    "imports": {"allow", "deny", "allow_add", "deny_add", "allow_remove", "deny_remove"},
    "code": {"mode"},
}
_MODULE_RE = re.compile(r"^[A-Za-z_*?\[\]][A-Za-z0-9_.*?\[\]!-]*$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Policy(Frozen):
    """A validated policy.  Build with :meth:`Policy.load`; derive with :meth:`with_overrides` (validated)
    or ``replace(**changes)`` (not validated: for values checked already).  Immutable."""

    __slots__ = ("name", "description", "source", "limits", "network", "preload", "imports", "code_mode", "env",
                 "isolation_minimum")
    name: str
    description: str
    source: str
    limits: Limits
    network: bool
    preload: tuple[str, ...]
    imports: Imports
    code_mode: str
    env: tuple[tuple[str, str], ...]
    isolation_minimum: str

    def __init__(self, name: str = "custom", description: str = "", source: str = "<builtin>",
                 limits: Limits | None = None, network: bool = False, preload: tuple[str, ...] = (),
                 imports: Imports | None = None, code_mode: str = "python",
                 env: tuple[tuple[str, str], ...] = (), isolation_minimum: str = "landlock") -> None:
        if isolation_minimum not in ISOLATION_LEVELS:
            raise PolicyError(f"isolation minimum must be one of {', '.join(map(repr, ISOLATION_LEVELS))}, "
                              f"got {isolation_minimum!r}")
        self._set(name=name, description=description, source=source, limits=limits or Limits(), network=network,
                  preload=preload, imports=imports or Imports(), code_mode=code_mode, env=env,
                  isolation_minimum=isolation_minimum)

    def admits(self, backend: str) -> bool:
        """Whether a jail of ``backend`` gives at least this policy's isolation minimum."""
        level = BACKEND_LEVEL.get(backend, "none")
        return ISOLATION_LEVELS.index(level) >= ISOLATION_LEVELS.index(self.isolation_minimum)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: "str | os.PathLike[str] | Policy | None" = None) -> "Policy":
        """Load a built-in policy by name or a policy file by path (default: ``standard``)."""
        if isinstance(spec, Policy):
            return spec
        if spec is None:
            spec = "standard"
        path = _resolve(str(spec), base=None)
        return _build(_load_chain(path, seen=()), source=str(path))

    def with_overrides(self, **overrides: Any) -> "Policy":
        """Return a copy with limits overridden.

        Accepts every :class:`Limits` field plus the aliases ``timeout`` (= ``wall_s``),
        ``memory`` (= ``memory_mib``), ``network`` (bool) and ``isolation`` (the isolation minimum:
        "namespaces", "landlock" or "none").  ``None`` values are ignored.
        """
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if not overrides:
            return self
        network = overrides.pop("network", self.network)
        if not isinstance(network, bool):
            raise PolicyError(f"override 'network' must be true or false, got {network!r}")
        minimum = overrides.pop("isolation", self.isolation_minimum)
        if minimum not in ISOLATION_LEVELS:
            raise PolicyError(f"override 'isolation' must be one of {', '.join(map(repr, ISOLATION_LEVELS))}, "
                              f"got {minimum!r}")
        aliases = {"timeout": "wall_s", "memory": "memory_mib"}
        limits = {}
        for key, value in overrides.items():
            name = aliases.get(key, key)
            if name not in _LIMIT_RULES:
                allowed = ", ".join(sorted([*_LIMIT_RULES, *aliases, "network", "isolation"]))
                raise PolicyError(f"unknown override {key!r}; allowed: {allowed}")
            limits[name] = _check_limit(f"override {key!r}", name, value)
        return self.replace(limits=self.limits.replace(**limits), network=network, isolation_minimum=minimum)

    # -- views -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "limits": self.limits.as_dict(),
            "network": {"enabled": self.network},
            "preload": {"modules": list(self.preload)},
            "imports": {"allow": list(self.imports.allow), "deny": list(self.imports.deny)},
            "code": {"mode": self.code_mode},
            "isolation": {"minimum": self.isolation_minimum},
            "env": dict(self.env),
        }

    def to_toml(self) -> str:
        d = self.to_dict()
        out = [f"# effective policy (from {self.source})", f"name = {_toml(d['name'])}",
               f"description = {_toml(d['description'])}"]
        for section in ("limits", "network", "preload", "imports", "code", "isolation", "env"):
            out.append(f"\n[{section}]")
            for k, v in d[section].items():
                if v is not None:
                    out.append(f"{k} = {_toml(v)}")
        return "\n".join(out) + "\n"


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def looks_like_path(spec: str) -> bool:
    """A policy spec that names a file (else it names a built-in policy)."""
    return "/" in spec or spec.endswith(".toml") or os.sep in spec


def _resolve(spec: str, base: Path | None) -> Path:
    if looks_like_path(spec):
        path = Path(spec).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if not path.is_file():
            raise PolicyError(f"policy file {str(path)!r} does not exist")
        return path.resolve()
    if not re.fullmatch(r"[A-Za-z0-9_-]+", spec):
        raise PolicyError(f"policy name {spec!r} is not valid; built-in policies: {', '.join(builtin_policy_names())}")
    path = policies_dir() / f"{spec}.toml"
    if not path.is_file():
        raise PolicyError(
            f"unknown policy {spec!r}; built-in policies: {', '.join(builtin_policy_names())} "
            f"(or pass the path of a .toml policy file)"
        )
    return path


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {str(path)!r}: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError(f"policy file {str(path)!r} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {str(path)!r} is not valid TOML: {exc}") from None


def _load_chain(path: Path, seen: tuple[Path, ...]) -> list[tuple[Path, dict[str, Any]]]:
    """The file and its ``extends`` ancestors, root first."""
    if path in seen:
        cycle = " -> ".join(str(p) for p in (*seen, path))
        raise PolicyError(f"policy 'extends' forms a cycle: {cycle}")
    data = _read(path)
    _check_shape(path, data)
    parent = data.get("extends")
    chain = _load_chain(_resolve(parent, base=path.parent), (*seen, path)) if parent else []
    return [*chain, (path, data)]


def _check_shape(path: Path, data: dict[str, Any]) -> None:
    where = f"policy file {str(path)!r}"
    for key, value in data.items():
        if key not in _TOP_KEYS:
            raise PolicyError(f"{where}: unknown key {key!r}; allowed: {', '.join(sorted(_TOP_KEYS))}")
        if key in ("name", "description", "extends") and not isinstance(value, str):
            raise PolicyError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        if key in ("limits", "env", *_SECTION_KEYS) and not isinstance(value, dict):
            raise PolicyError(f"{where}: [{key}] must be a table")
    for section, allowed in [*_SECTION_KEYS.items(), ("limits", set(_LIMIT_RULES))]:
        for key in data.get(section, {}):
            if key not in allowed:
                raise PolicyError(
                    f"{where}: unknown key {section}.{key!r}; allowed in [{section}]: {', '.join(sorted(allowed))}"
                )
    for key, value in data.get("limits", {}).items():
        _check_limit(f"{where}: limits.{key}", key, value)
    net = data.get("network", {})
    if "enabled" in net and not isinstance(net["enabled"], bool):
        raise PolicyError(f"{where}: network.enabled must be true or false, got {net['enabled']!r}")
    for section, key in [("preload", "modules"), *(("imports", k) for k in _SECTION_KEYS["imports"])]:
        value = data.get(section, {}).get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(m, str) and _MODULE_RE.match(m) for m in value):
            raise PolicyError(
                f"{where}: {section}.{key} must be a list of module names or globs like \"numpy\" or "
                f"\"numpy.*\", got {value!r}"
            )
    minimum = data.get("isolation", {}).get("minimum")
    if minimum is not None and minimum not in ISOLATION_LEVELS:
        raise PolicyError(f"{where}: isolation.minimum must be one of {', '.join(map(repr, ISOLATION_LEVELS))} "
                          f"(the least isolation a run accepts), got {minimum!r}")
    mode = data.get("code", {}).get("mode")
    if mode is not None and mode not in CODE_MODES:
        raise PolicyError(f"{where}: code.mode must be one of {', '.join(map(repr, CODE_MODES))}, got {mode!r}")
    for key, value in data.get("env", {}).items():
        if not _ENV_RE.match(key) or not isinstance(value, str) or "\0" in value:
            raise PolicyError(f"{where}: env.{key} must be NAME = \"string value\" (NAME: letters, digits, _)")


def _check_limit(where: str, key: str, value: Any) -> Any:
    kind, lo, hi, desc = _LIMIT_RULES[key]
    ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type:
        raise PolicyError(f"{where} must be {desc}; got {value!r}")
    if not lo <= value <= hi:
        raise PolicyError(f"{where} must be {desc}; got {value!r}")
    return kind(value)


def _build(chain: list[tuple[Path, dict[str, Any]]], source: str) -> Policy:
    limits: dict[str, Any] = {}
    name, description = "custom", ""
    network = False
    preload: list[str] = []
    allow: list[str] = []
    deny: list[str] = []
    mode = "python"
    minimum = "landlock"
    env: dict[str, str] = {}
    for path, data in chain:
        name = data.get("name", path.stem if path == chain[-1][0] else name)
        description = data.get("description", description)
        limits.update(data.get("limits", {}))
        network = data.get("network", {}).get("enabled", network)
        preload = list(data.get("preload", {}).get("modules", preload))
        imp = data.get("imports", {})
        allow = list(imp.get("allow", allow)) + list(imp.get("allow_add", []))
        deny = list(imp.get("deny", deny)) + list(imp.get("deny_add", []))
        allow = [m for m in allow if m not in imp.get("allow_remove", [])]
        deny = [m for m in deny if m not in imp.get("deny_remove", [])]
        mode = data.get("code", {}).get("mode", mode)
        minimum = data.get("isolation", {}).get("minimum", minimum)
        env.update(data.get("env", {}))
    kw = {k: _LIMIT_RULES[k][0](v) for k, v in limits.items()}
    return Policy(
        name=name,
        description=description,
        source=source,
        limits=Limits(**kw),
        network=network,
        preload=tuple(dict.fromkeys(preload)),
        imports=Imports(allow=tuple(dict.fromkeys(allow)), deny=tuple(dict.fromkeys(deny))),
        code_mode=mode,
        env=tuple(sorted(env.items())),
        isolation_minimum=minimum,
    )
