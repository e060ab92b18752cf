"""What an operator sees of the engine: the audit log (one JSON line per run, for every caller) and the
Prometheus metrics, read back with prometheus_client's own parser.  Real jails, no mocks."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jailcell import AsyncSandbox, AuditLog, InputError, Pool, Sandbox, audit_context, enable_metrics

SPIN = "while True: pass"
HOG = "x = []\nwhile True: x.append(bytearray(8 * 1024 * 1024))"


def scrape() -> dict[tuple[str, tuple], float]:
    """Every sample of jailcell's registry: (name, sorted labels) -> value."""
    body, _ = enable_metrics().exposition()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_run_gets_one_audit_line_and_refused_requests_none(tmp_path):
    log = tmp_path / "audit.jsonl"
    calls = {"lookup": lambda key: {"a": 1}.get(key)}
    with Sandbox("minimal", audit=str(log), functions=calls, memory=64) as sb:
        with audit_context(request_id="req-1", who="alice", conversation="conv-9"):
            ok = sb.run("print(lookup('a'), lookup('b'))\nopen('out.txt', 'w').write('hello')")
        timeout = sb.run(SPIN, timeout=1)
        memory = sb.run(HOG)
        error = sb.run("1/0")
        for bad in ("print(1)\0", "x" * (sb.policy.limits.code_bytes + 1)):
            with pytest.raises(InputError):
                sb.run(bad)
        with pytest.raises(InputError):
            sb.run("1", timeout=-1)
        with sb.session() as s:
            s.run("y = 1")
            s.run("y + 1")
            sid = s._audit_id
    assert [r.status for r in (ok, timeout, memory, error)] == ["ok", "timeout", "memory_limit", "error"]
    got = lines(log)
    assert [g["status"] for g in got] == ["ok", "timeout", "memory_limit", "error", "ok", "ok"]
    first = got[0]
    assert first["request_id"] == "req-1" and first["who"] == "alice" and first["conversation"] == "conv-9"
    assert first["host_calls"] == {"lookup": 2} and first["files"] == [{"name": "out.txt", "size": 5}]
    assert first["policy"] == "minimal" and len(first["policy_sha256"]) == 64
    import hashlib

    assert first["code_sha256"] == hashlib.sha256(
        b"print(lookup('a'), lookup('b'))\nopen('out.txt', 'w').write('hello')").hexdigest()
    assert "code" not in first  # only with code=True
    assert first["backend"] == ok.isolation["backend"] and first["degraded"] == ok.isolation["degraded"]
    assert first["duration_s"] == round(ok.duration_s, 6) and first["peak_memory_bytes"] == ok.peak_memory_bytes
    assert got[1]["request_id"] is None and got[1]["error_type"] == "Timeout"
    assert got[2]["error_type"] == "MemoryLimit" and got[3]["error_type"] == "ZeroDivisionError"
    assert got[4]["session"] == got[5]["session"] == sid and got[0]["session"] is None
    assert all(g["time"].endswith("Z") for g in got)


def test_cancelled_runs_and_every_caller_are_audited(tmp_path):
    """The async twin, a cancelled run, Pool.map and a session fork: all through the same line writer."""
    log = AuditLog(tmp_path / "audit.jsonl", code=True)

    async def main():
        async with AsyncSandbox("minimal", audit=log) as sb:
            task = asyncio.ensure_future(sb.run(SPIN, timeout=20))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await sb.run("print('after')")

    asyncio.run(main())
    with Pool(2, "minimal", audit=log) as pool:
        pool.map([f"print({i})" for i in range(5)])
    got = lines(tmp_path / "audit.jsonl")
    assert [g["status"] for g in got[:2]] == ["killed", "ok"], got[:2]
    assert got[0]["code"] == SPIN and got[0]["error_type"] == "Interrupted"
    assert sorted(g["code"] for g in got[2:]) == [f"print({i})" for i in range(5)]


def test_an_unwritable_audit_log_never_fails_a_run_and_is_counted(tmp_path, caplog):
    enable_metrics()
    before = value(scrape(), "jailcell_audit_write_errors_total")
    missing = tmp_path / "no-such-folder" / "audit.jsonl"
    with caplog.at_level(logging.WARNING, logger="jailcell"):
        with Sandbox("minimal", audit=str(missing)) as sb:
            results = [sb.run("print(1)") for _ in range(3)]
        with Sandbox("minimal", audit="/dev/full") as sb:  # a full disk: every write fails with ENOSPC
            results.append(sb.run("print(2)"))
    assert [r.status for r in results] == ["ok"] * 4
    assert value(scrape(), "jailcell_audit_write_errors_total") - before == 4
    said = [r.getMessage() for r in caplog.records if "audit log" in r.getMessage()]
    assert len(said) == 2 and str(missing) in said[0] and "No such file" in said[0]  # once per log, not per run
    assert "/dev/full" in said[1] and "No space left" in said[1]
    assert not missing.parent.exists()


def test_the_audit_log_rotates_by_size_and_is_private(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=4096, backups=2)
    with Sandbox("minimal", audit=log) as sb:
        for i in range(40):
            sb.run(f"print({i})")
    kept = [path, path.with_name("audit.jsonl.1"), path.with_name("audit.jsonl.2")]
    assert all(p.exists() for p in kept) and not path.with_name("audit.jsonl.3").exists()
    assert all(p.stat().st_size <= 4096 for p in kept)
    assert (path.stat().st_mode & 0o777) == 0o600
    total = sum(len(lines(p)) for p in kept)
    assert 0 < total < 40 and len(lines(path)) >= 1  # the oldest went, every kept line is whole JSON
    with pytest.raises(InputError, match="max_bytes"):
        AuditLog(path, max_bytes=10)


def test_the_environment_turns_the_audit_log_on(tmp_path, monkeypatch):
    monkeypatch.setenv("JAILCELL_AUDIT_LOG", str(tmp_path / "env.jsonl"))
    monkeypatch.setenv("JAILCELL_AUDIT_CODE", "1")
    with Sandbox("minimal") as sb:
        sb.run("print('from env')")
    with Sandbox("minimal", audit=False) as sb:
        sb.run("print('not audited')")
    assert [g["code"] for g in lines(tmp_path / "env.jsonl")] == ["print('from env')"]


def test_metrics_count_exactly_what_ran(tmp_path):
    enable_metrics()
    before = scrape()
    with Sandbox("minimal", memory=64) as sb:
        with audit_context(who="team-a"):
            sb.run("print(1)")
            sb.run("1/0")
        sb.run(SPIN, timeout=1)
        sb.run(HOG)
        with pytest.raises(InputError):
            sb.run("\0")
        backend = sb.isolation["backend"]
        during = scrape()
    after = scrape()

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    for status in ("ok", "error", "timeout", "memory_limit"):
        assert moved("jailcell_runs_total", policy="minimal", status=status, backend=backend) == 1, status
    assert moved("jailcell_run_duration_seconds_count", policy="minimal") == 4
    assert moved("jailcell_run_peak_memory_bytes_count", policy="minimal") == 4
    assert moved("jailcell_run_duration_seconds_sum", policy="minimal") >= 1.0  # the timeout's second
    assert moved("jailcell_key_runs_total", key="team-a") == 2
    assert moved("jailcell_jail_starts_total", backend=backend) == 1
    assert value(during, "jailcell_jails", kind="stateless") >= 1 and value(during, "jailcell_spare_cells") >= 1
    names = {name for name, _ in after}
    assert all(n.startswith(("jailcell_", "process_", "python_")) for n in names)
    # no label takes a request's content or ids
    for (_name, labels) in after:
        for key, _val in labels:
            assert key in ("policy", "status", "backend", "kind", "key", "function", "cause", "le", "service",
                           "route", "limit", "implementation", "major", "minor", "patchlevel", "version"), key


FD_STARVED = r"""
import os, resource
from jailcell import JailError, Sandbox, enable_metrics
m = enable_metrics()
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 2, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    Sandbox("minimal").run("1")
except JailError as exc:
    print("refused:", "no file descriptors left" in str(exc))
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
with Sandbox("minimal") as sb:
    sb.run("1")
print(m.exposition()[0].decode())
"""


def test_jail_start_failures_are_counted_by_cause():
    """A process out of file descriptors cannot start a jail: counted under its cause, next to the start
    that worked once there were descriptors again."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", FD_STARVED], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("refused: True"), r.stdout[:500] + r.stderr[-2000:]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(r.stdout.split("\n", 1)[1]) for s in f.samples}
    failures = {labels: v for (name, labels), v in samples.items() if name == "jailcell_jail_start_failures_total"}
    assert list(failures.values()) == [1.0] and ("cause", "resources") in next(iter(failures)), failures
    assert sum(v for (name, _), v in samples.items() if name == "jailcell_jail_starts_total") == 1
