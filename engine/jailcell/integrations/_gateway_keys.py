"""Named API keys with limits (``jailcell serve --keys FILE``), and the request id of every request.

The file (TOML) names each client, the policy its code runs under, and its limits::

    [[key]]
    name = "alice"              # what the metrics, the audit log and the access log call it
    sha256 = "9f86d0..."        # sha256 of the key (or: key = "jc-...", the key itself)
    policy = "standard"         # default: the gateway's --policy
    max_containers = 4          # containers (Python sessions) it may hold at once; default: no cap of its own
    runs_per_minute = 120       # code runs in any 60 s; default: no cap

Keys are kept only as sha256 digests and compared in constant time against every key (the time a
request takes does not say which key nearly matched).  Over a limit a request gets ``429`` with
``Retry-After``; the runs limit is checked when a request arrives (a request admitted may finish the
runs it started).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import re
import time
from pathlib import Path
from typing import Any

from .._errors import PolicyError
from ._gateway_guard import new_key

FIELDS = {"name", "key", "sha256", "policy", "max_containers", "runs_per_minute"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def request_id(sent: str | None) -> str:
    """The client's ``X-Request-Id`` if it is a sane token (letters, digits, ``._:-``, at most 128), else a new one."""
    if sent and REQUEST_ID.fullmatch(sent):
        return sent
    return "req_" + new_key()[3:27]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def owner_of(key: Key | None) -> str | None:
    """Whose a container or a stored response is: the key's name (None without named keys)."""
    return key.name if key is not None else None


class Key:
    """One client: its name, the sha256 of its key, its policy and its limits."""

    def __init__(self, name: str, digest: bytes, policy: str | None = None, max_containers: int | None = None,
                 runs_per_minute: int | None = None) -> None:
        self.name, self.digest, self.policy = name, digest, policy
        self.max_containers, self.runs_per_minute = max_containers, runs_per_minute
        self._runs: collections.deque[float] = collections.deque()

    def count_run(self) -> None:
        if self.runs_per_minute is not None:  # (a key without the limit keeps no record)
            self._runs.append(time.monotonic())
            while len(self._runs) > self.runs_per_minute:  # more than the window can ever need
                self._runs.popleft()

    def runs_retry_after(self) -> int | None:
        """Seconds until this key may run again, or None if it is under its runs limit now."""
        if self.runs_per_minute is None:
            return None
        now = time.monotonic()
        while self._runs and self._runs[0] <= now - 60:
            self._runs.popleft()
        if len(self._runs) < self.runs_per_minute:
            return None
        return max(1, math.ceil(self._runs[-self.runs_per_minute] + 60 - now))


class Keys:
    """The keys a gateway accepts."""

    def __init__(self, keys: list[Key]) -> None:
        if not keys:
            raise PolicyError("no keys: give at least one")
        self.keys = keys

    @classmethod
    def single(cls, key: str) -> "Keys":
        """The one shared key of ``--api-key`` (or the generated one): nameless, without limits."""
        return cls([Key("default", _digest(key))])

    @classmethod
    def load(cls, path: str | Path) -> "Keys":
        """Read a keys file; a PolicyError names the file, the entry and what is wrong."""
        import tomllib

        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read the keys file: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PolicyError(f"{path}: not valid TOML: {exc}") from None
        extra = set(data) - {"key"}
        if extra or not isinstance(data.get("key"), list):
            raise PolicyError(f"{path}: expected [[key]] tables only" + (f"; unknown: {', '.join(sorted(extra))}"
                                                                          if extra else ""))
        keys: list[Key] = []
        for i, entry in enumerate(data["key"], 1):
            where = f"{path}: [[key]] #{i}"
            unknown = set(entry) - FIELDS
            if unknown:
                raise PolicyError(f"{where}: unknown field {', '.join(sorted(unknown))}; allowed: "
                                  f"{', '.join(sorted(FIELDS))}")
            name = entry.get("name")
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise PolicyError(f"{where}: name must be 1-64 letters, digits or ._@- (it is a metrics label), "
                                  f"not {name!r}")
            where = f"{path}: key {name!r}"
            if any(k.name == name for k in keys):
                raise PolicyError(f"{where}: the name is used twice")
            if ("key" in entry) == ("sha256" in entry):
                raise PolicyError(f"{where}: give exactly one of key (the key) or sha256 (its sha256, hex)")
            if "key" in entry:
                if not isinstance(entry["key"], str) or len(entry["key"]) < 16:
                    raise PolicyError(f"{where}: key must be a string of at least 16 characters")
                digest = _digest(entry["key"])
            else:
                hexed = entry["sha256"]
                if not isinstance(hexed, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", hexed):
                    raise PolicyError(f"{where}: sha256 must be 64 hex digits (`printf %s KEY | sha256sum`)")
                digest = bytes.fromhex(hexed)
            if any(hmac.compare_digest(k.digest, digest) for k in keys):
                raise PolicyError(f"{where}: the same key as another entry")
            policy = entry.get("policy")
            if policy is not None and (not isinstance(policy, str) or not policy):
                raise PolicyError(f"{where}: policy must be a policy name or file")
            limits: dict[str, Any] = {}
            for field in ("max_containers", "runs_per_minute"):
                value = entry.get(field)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise PolicyError(f"{where}: {field} must be a positive integer, not {value!r}")
                limits[field] = value
            keys.append(Key(name, digest, policy, **limits))
        return cls(keys)

    def find(self, authorization: str) -> Key | None:
        """The key an ``Authorization: Bearer ...`` header presents, or None.  Every key is compared."""
        scheme, _, sent = authorization.strip().partition(" ")
        digest = _digest(sent.strip())
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found if scheme.lower() == "bearer" else None

    def policies(self) -> set[str]:
        return {k.policy for k in self.keys if k.policy is not None}
