"""The MCP server with the real `mcp` client, over stdio and over streamable HTTP."""

import asyncio
import base64
import json
import socket
import subprocess
import sys
import time

import pytest
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters

PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.show()\n'plotted'"


def stdio_params(*extra):
    return StdioServerParameters(command=sys.executable, args=["-m", "jailcell", "mcp", *extra])


def text(result):
    return "\n".join(c.text for c in result.content if c.type == "text")


async def exercise(client):
    tools = {t.name for t in (await client.list_tools()).tools}
    assert tools == {"run_python", "create_session", "close_session", "upload_file", "download_file"}

    r = await client.call_tool("run_python", {"code": "print(6 * 7)\n'done'"})
    assert not r.is_error and "42" in text(r) and "'done'" in text(r)

    r = await client.call_tool("run_python", {"code": PLOT})
    images = [c for c in r.content if c.type == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png"
    assert base64.b64decode(images[0].data).startswith(b"\x89PNG")
    assert "[image 1: image/png" in text(r)

    r = await client.call_tool("run_python", {"code": "1/0"})
    assert "ZeroDivisionError" in text(r) and "[status: error" in text(r)
    r = await client.call_tool("run_python", {"code": "while True: pass", "timeout": 1})
    assert "[status: timeout" in text(r)

    sid = text(await client.call_tool("create_session", {}))
    await client.call_tool("run_python", {"code": "x = 20", "session_id": sid})
    r = await client.call_tool("run_python", {"code": "x + 22", "session_id": sid})
    assert "42" in text(r)
    r = await client.call_tool("upload_file", {"session_id": sid, "name": "in.txt",
                                               "content_base64": base64.b64encode(b"hello").decode()})
    assert not r.is_error
    await client.call_tool("run_python", {"code": "open('out.txt', 'w').write(open('in.txt').read().upper())",
                                          "session_id": sid})
    r = await client.call_tool("download_file", {"session_id": sid, "name": "out.txt"})
    assert base64.b64decode(text(r)) == b"HELLO"
    r = await client.call_tool("download_file", {"session_id": sid, "name": "../../etc/passwd"})
    assert r.is_error and "relative" in text(r)
    await client.call_tool("close_session", {"session_id": sid})
    r = await client.call_tool("run_python", {"code": "x", "session_id": sid})
    assert r.is_error and "no open session" in text(r)


def test_mcp_over_stdio():
    async def main():
        async with Client(stdio_params("--policy", "standard")) as client:
            import jailcell

            assert client.server_info.name == "jailcell" and client.server_info.version == jailcell.__version__
            await exercise(client)

    asyncio.run(main())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_http(*args: str) -> tuple[subprocess.Popen, str]:
    """`jailcell mcp --transport http` on a free port, once it accepts connections; its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jailcell", "mcp", "--transport", "http", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}/mcp"


def test_mcp_over_streamable_http():
    proc, url = start_http()
    try:
        async def main():
            async with Client(url) as client:
                await exercise(client)

        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mcp_bad_policy_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "jailcell", "mcp", "--policy", "nope"], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 2 and b"unknown policy" in r.stderr


def test_a_cancelled_mcp_call_stops_its_code():
    """The client gives up on a call (it sends notifications/cancelled): the server kills the code
    instead of letting it spin until its limit, and keeps serving."""
    import psutil

    from ..conftest import busiest_cpu_s

    async def main():
        async with Client(stdio_params("--policy", "minimal")) as client:
            await client.call_tool("run_python", {"code": "print(1)"})
            def is_server(proc) -> bool:
                try:
                    return "mcp" in proc.cmdline()
                except psutil.Error:  # a zombie or a process that just ended: not the live server
                    return False

            server = next(p for p in psutil.Process().children() if is_server(p))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.call_tool("run_python", {"code": "while True: pass", "timeout": 10}), 1.5)
            await asyncio.sleep(1.0)
            assert busiest_cpu_s(server.pid) < 0.2  # nothing of the server's spins any more
            r = await client.call_tool("run_python", {"code": "print(7)"})
            assert "7" in text(r)

    asyncio.run(main())


def test_mcp_sessions_expire_when_idle_make_room_for_others_and_timeouts_stay_within_the_policy():
    """One client cannot hold every session (64 at once locked everyone out for minutes): when the server
    is full the least recently used session is closed for a newcomer; unused sessions end; a run's
    timeout stays within the policy's limit (86400 was accepted)."""
    proc, url = start_http("--policy", "minimal", "--max-sessions", "3", "--session-idle", "3")
    try:

        async def main():
            async with Client(url) as a, Client(url) as b:
                r = await a.call_tool("run_python", {"code": "print(1)", "timeout": 86400})
                assert r.is_error and "at most 10 s" in text(r)
                ids = [text(await a.call_tool("create_session", {})) for _ in range(3)]
                for sid in ids[1:]:
                    await a.call_tool("run_python", {"code": "x = 1", "session_id": sid})
                other = await b.call_tool("create_session", {})  # the server is full: the LRU one makes room
                assert not other.is_error
                r = await a.call_tool("run_python", {"code": "1", "session_id": ids[0]})
                assert r.is_error and "no open session" in text(r)
                assert "1" in text(await a.call_tool("run_python", {"code": "x", "session_id": ids[1]}))
                await asyncio.sleep(4.5)  # unused for longer than --session-idle
                r = await b.call_tool("run_python", {"code": "1", "session_id": text(other)})
                assert r.is_error and "no open session" in text(r)

        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert b"without authentication" in proc.stderr.read()


def test_mcp_sessions_close_when_their_client_goes_away():
    """A client of the session-id protocol (Mcp-Session-Id) that ends its MCP session takes its sandbox
    sessions with it: their ids are gone for everyone and their jails end, instead of each holding a jail
    until it idles out; one such client holds at most --sessions-per-client at once."""
    import psutil

    proc, url = start_http("--policy", "minimal", "--sessions-per-client", "2")
    server = psutil.Process(proc.pid)

    def jails() -> set[int]:
        """The server's direct children: one process (nsjail's) per jail."""
        return {p.pid for p in server.children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}

    try:
        async def main():
            async with Client(url, mode="legacy") as b:
                assert "1" in text(await b.call_tool("run_python", {"code": "print(1)"}))
                before = jails()
                async with Client(url, mode="legacy") as a:
                    ids = [text(await a.call_tool("create_session", {})) for _ in range(2)]
                    r = await a.call_tool("create_session", {})
                    assert r.is_error and "this client has 2 open sessions" in text(r)
                    for sid in ids:
                        await a.call_tool("run_python", {"code": "x = 1", "session_id": sid})
                    theirs = jails() - before
                    assert len(theirs) >= 2, theirs  # a jail per session
                    # another client may use them while they are open (ids are capabilities) ...
                    assert "1" in text(await b.call_tool("run_python", {"code": "x", "session_id": ids[0]}))
                # ... and not once their client is gone (its exit sent DELETE)
                for sid in ids:
                    r = await b.call_tool("run_python", {"code": "x", "session_id": sid})
                    assert r.is_error and "no open session" in text(r)
                deadline = time.monotonic() + 20
                while jails() & theirs and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                assert not jails() & theirs  # their jails ended
                sid = text(await b.call_tool("create_session", {}))  # b's own sessions are untouched
                assert "2" in text(await b.call_tool("run_python", {"code": "1 + 1", "session_id": sid}))

        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mcp_over_http_serves_health_metrics_and_request_ids(tmp_path):
    """What an operator watches: /healthz and /readyz, /metrics (scraped with prometheus_client's parser)
    moving by exactly the runs made, an audit line per run naming the MCP call, a request id per request."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    audit = tmp_path / "audit.jsonl"
    proc, url = start_http("--policy", "minimal", "--audit-log", str(audit))
    base = url.rsplit("/mcp", 1)[0]

    def runs() -> dict:
        text_ = httpx.get(f"{base}/metrics").text
        return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text_)
                for s in f.samples if s.name == "jailcell_runs_total"}

    try:
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{base}/readyz", headers={"X-Request-Id": "probe-1"})
        assert ready.status_code == 200 and ready.headers["x-request-id"] == "probe-1"
        before = runs()

        async def main():
            async with Client(url, mode="legacy") as client:
                await client.call_tool("run_python", {"code": "print(1)"})
                sid = text(await client.call_tool("create_session", {}))
                await client.call_tool("run_python", {"code": "1/0", "session_id": sid})
                return sid

        sid = asyncio.run(main())
        after = runs()
        ok = [k for k in after if ("status", "ok") in k][0]
        err = [k for k in after if ("status", "error") in k][0]
        assert after[ok] - before.get(ok, 0) == 1 and after[err] - before.get(err, 0) == 1
        gauges = httpx.get(f"{base}/metrics").text
        assert "jailcell_http_requests_total{" in gauges and 'service="mcp"' in gauges
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [line["status"] for line in lines] == ["ok", "error"]
    assert lines[1]["conversation"] == sid and lines[0]["conversation"] is None
    assert all(line["request_id"].startswith("mcp-") for line in lines)
    assert b"request_id=probe-1" in proc.stderr.read()  # the access line
