"""`jailcell serve` against hostile web pages, hostile clients and hostile upstreams: nothing runs code
or spends the upstream's key without the key, no page of another origin drives it (a real headless
browser tries), and whatever the upstream sends is bounded and checked."""

from __future__ import annotations

import http.server
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from jailcell.integrations import gateway as gateway_mod

from ..conftest import wait_for
from ..fake_upstream import FakeUpstream, Raw, code_call, raw_json, raw_sse
from .test_gateway import AUTH, Running, _listening, answer, free_port
from .test_playground import browser  # noqa: F401 - the fixture

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "code_interpreter"}]}


def hello():
    return {"role": "assistant", "content": "hello"}


@pytest.fixture
def up():
    u = FakeUpstream([hello() for _ in range(20)])
    yield u
    u.close()


# -- who may use it ----------------------------------------------------------------------------

def test_without_a_key_one_is_made_and_required(up):
    g = Running(up.url, api_key=None)
    try:
        key = g.gateway.api_key
        assert g.gateway.generated_key and key and len(key) >= 24
        r = httpx.post(f"{g.url}/chat/completions", json=CHAT)
        assert r.status_code == 401 and up.requests == []
        r = httpx.post(f"{g.url}/chat/completions", json=CHAT, headers={"Authorization": f"bearer {key}"})
        assert r.status_code == 200, r.text  # the scheme is case-insensitive
        assert Running  # (another gateway makes another key)
    finally:
        g.close()


def test_the_cli_prints_a_made_key_once_and_refuses_no_auth_off_loopback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jailcell", "serve", "--upstream", "http://127.0.0.1:9/v1",
                          "--no-auth", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--no-auth is refused" in out.stderr and "loopback" in out.stderr
    up = FakeUpstream([hello()])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("JAILCELL_API_KEY",)}
    creds = up.url.replace("http://", "http://alice:pw-s3cret-pw@")
    proc = subprocess.Popen([sys.executable, "-m", "jailcell", "serve", "--upstream", creds, "--port", str(port),
                             "--policy", "minimal"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert wait_for(lambda: _listening(port), 60)
        line = ""
        while "playground:" not in line:
            line += proc.stderr.readline()
        key = line.split("shown once): ")[1].split()[0]
        assert f"http://127.0.0.1:{port}/#key={key}" in line  # a fragment: never sent to a server or logged
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT,
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello"
        assert up.headers[0]["Authorization"].startswith("Basic ")  # the URL's credentials went upstream only
        up.close()  # now the upstream is gone: the error names it without its credentials
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT,
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 502 and "***@127.0.0.1" in r.text and "s3cret" not in r.text, r.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        logged = proc.stderr.read() + proc.stdout.read()
    assert "s3cret" not in logged and "***@127.0.0.1" in logged
    assert logged.count(key) == 0  # printed once, on the line read above; never in an access line


# -- which requests reach a route ----------------------------------------------------------------

def test_cross_site_requests_are_refused_before_any_route(up):
    g = Running(up.url, no_auth=True, api_key=None, allowed_hosts=["gw.internal"])
    try:
        url = f"{g.url}/chat/completions"
        data = json.dumps(CHAT)
        # a "simple" cross-origin POST, as any page may send it without a preflight
        r = httpx.post(url, content=data, headers={"Content-Type": "text/plain", "Origin": "http://127.0.0.1:9999"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
        r = httpx.post(url, content=data, headers={"Content-Type": "text/plain", "Origin": "null"})  # file:// pages
        assert r.status_code == 403
        r = httpx.post(url, content=data, headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
        r = httpx.post(url, content=data, headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 415
        # DNS rebinding: the browser names the attacker's host
        for host in ("evil.example", f"evil.example:{g.port}", "127.0.0.1.evil.example"):
            r = httpx.post(url, json=CHAT, headers={"Host": host})
            assert r.status_code == 421 and "--allowed-host" in r.json()["error"]["message"], host
        r = httpx.get(f"{g.base}/v1/models/", headers={"Host": "evil.example"})  # no redirect that echoes it
        assert r.status_code == 421 and "evil.example/" not in r.headers.get("location", "")
        assert up.requests == []
        # what is allowed: this server's names, its IP, an allowed name, its own origin
        for host in (f"localhost:{g.port}", f"127.0.0.1:{g.port}", "gw.internal"):
            r = httpx.post(url, json=CHAT, headers={"Host": host, "Origin": f"http://{host}"})
            assert r.status_code == 200, (host, r.text)
            assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
            assert "access-control-allow-origin" not in r.headers
    finally:
        g.close()


def test_an_allowed_origin_gets_real_cors(up):
    g = Running(up.url, cors_origins=["https://app.example"])
    try:
        url = f"{g.url}/chat/completions"
        pre = httpx.options(url, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        r = httpx.post(url, json=CHAT, headers={**AUTH, "Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.post(url, json=CHAT, headers={"Origin": "https://app.example"})  # CORS is no key
        assert r.status_code == 401
        pre = httpx.options(url, headers={"Origin": "https://other.example", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers
    finally:
        g.close()


def test_the_playground_is_served_with_a_csp_and_keeps_the_key_per_tab(up):
    g = Running(up.url)
    try:
        r = httpx.get(g.base + "/")
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
        assert "'unsafe-inline'" not in csp and "script-src 'sha256-" in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"
        assert "localStorage" not in r.text and "sessionStorage" in r.text
    finally:
        g.close()


ATTACK_PAGE = """<!doctype html><html><body><script>
fetch(%(url)s, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: %(body)s})
  .then(() => { document.title = "sent"; }, () => { document.title = "failed"; });
</script></body></html>"""


def test_a_web_page_of_another_origin_cannot_drive_the_gateway(up, browser, tmp_path):  # noqa: F811
    """In headless Chromium, with the gateway at its weakest (--no-auth): a page on another localhost
    port and a local file:// page each send the simple cross-origin POST; nothing reaches the upstream."""
    g = Running(up.url, no_auth=True, api_key=None)
    page = ATTACK_PAGE % {"url": json.dumps(f"{g.url}/chat/completions"), "body": json.dumps(json.dumps(CHAT))}
    (tmp_path / "attack.html").write_text(page)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        for where in (f"http://127.0.0.1:{site.server_port}/attack.html", f"file://{tmp_path}/attack.html"):
            browser.get(where)
            assert wait_for(lambda: browser.title in ("sent", "failed"), 20), where
        assert up.requests == []
        # the same request from the gateway's own origin (its playground) is served
        browser.get(g.base + "/")
        got = browser.execute_script(
            "return await (await fetch('/v1/chat/completions', {method: 'POST', headers: {'Content-Type': "
            "'application/json'}, body: arguments[0]})).status", json.dumps(CHAT))
        assert got == 200 and len(up.requests) == 1
    finally:
        site.shutdown()
        site.server_close()
        g.close()


# -- requests ------------------------------------------------------------------------------------

def test_fields_that_multiply_cost_are_checked_and_unknown_ones_stay_here(up):
    g = Running(up.url)
    try:
        client = g.client("anything")
        msgs = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
            client.chat.completions.create(model="m", messages=msgs, n=3)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="m", messages=msgs, max_tokens=10 ** 9)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.responses.create(model="m", input="hi", max_output_tokens=10 ** 9)
        r = httpx.post(f"{g.base}/api/v1/services/aigc/text-generation/generation", headers=AUTH,
                       json={"model": "m", "input": {"prompt": "hi"}, "parameters": {"n": 4}})
        assert r.status_code == 400 and "parameters.n" in r.json()["message"]
        assert up.requests == []
        client.chat.completions.create(model="m", messages=msgs, temperature=0.5, max_tokens=100,
                                       extra_body={"best_of": 20, "mystery": {"x": 1}})
        sent = up.requests[-1]
        assert sent["temperature"] == 0.5 and sent["max_tokens"] == 100
        assert "best_of" not in sent and "mystery" not in sent
        r = httpx.post(f"{g.url}/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                       content=b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
        assert r.status_code == 400 and "NaN" in r.json()["error"]["message"]
    finally:
        g.close()


def test_stored_responses_are_bounded_in_bytes(up, monkeypatch):
    monkeypatch.setattr(gateway_mod, "MAX_STORED_BYTES", 1_000_000)
    g = Running(up.url)
    try:
        client = g.client("anything")
        ids = [client.responses.create(model="m", input="x" * 200_000 + str(i)).id for i in range(8)]
        assert g.gateway.stored_bytes <= 1_000_000 and len(g.gateway.stored) < 8
        with pytest.raises(openai.NotFoundError, match="MiB in all"):
            client.responses.create(model="m", input="again", previous_response_id=ids[0])
        client.responses.create(model="m", input="again", previous_response_id=ids[-1])  # the newest is kept
        client.responses.create(model="m", input="y" * 400_000)  # too large to keep at all: not stored
        assert g.gateway.stored_bytes <= 1_000_000
    finally:
        g.close()


def test_a_file_name_that_is_not_latin_1_downloads_with_its_name():
    name = "données-✓-数据.csv"
    up = FakeUpstream([{"role": "assistant", "content": None,
                        "tool_calls": [code_call("c1", f"open({name!r}, 'w').write('a,b')")]}, answer])
    g = Running(up.url)
    try:
        response = g.client("anything").responses.create(model="m", input="write it",
                                                        tools=[{"type": "code_interpreter"}])
        cid = response.output[0].container_id
        files = httpx.get(f"{g.url}/containers/{cid}/files", headers=AUTH).json()["data"]
        r = httpx.get(f"{g.url}/containers/{cid}/files/{files[0]['id']}/content", headers=AUTH)
        assert r.status_code == 200 and r.content == b"a,b"
        disposition = r.headers["content-disposition"]
        assert "filename*=UTF-8''donn%C3%A9es-%E2%9C%93-%E6%95%B0%E6%8D%AE.csv" in disposition
        assert disposition.encode("ascii")  # the fallback name is plain ASCII
    finally:
        g.close()
        up.close()


# -- hostile or broken upstreams -----------------------------------------------------------------

MALFORMED = {
    "tool call without id": {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "code_interpreter", "arguments": "{\"code\": \"1\"}"}}]},
    "function null": {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function",
                                                                            "function": None}]},
    "tool_calls an object": {"role": "assistant", "content": None, "tool_calls": {"id": "a"}},
    "content a number": {"role": "assistant", "content": 42},
    "content a list": {"role": "assistant", "content": [{"type": "text"}]},
}


def _completion(message, usage=None):
    return {"id": "x", "object": "chat.completion", "model": "fake", "choices": [{"index": 0, "message": message}],
            "usage": usage if usage is not None else {"prompt_tokens": 1}}


@pytest.mark.parametrize("case", [*MALFORMED, "usage a list", "choices an object"])
def test_a_malformed_completion_is_a_502_and_a_final_stream_event(case):
    if case == "usage a list":
        payload = _completion({"role": "assistant", "content": "hi"}, usage=[1, 2])
    elif case == "choices an object":
        payload = {"id": "x", "choices": {"message": {"content": "hi"}}}
    else:
        payload = _completion(MALFORMED[case])
    up = FakeUpstream([raw_json(payload), raw_json(payload), raw_json(payload)])
    g = Running(up.url)
    try:
        r = httpx.post(f"{g.url}/chat/completions", json=CHAT, headers=AUTH, timeout=60)
        assert r.status_code == 502 and "not a chat completion" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{g.url}/responses", json={"model": "m", "input": "x", "stream": True}, headers=AUTH,
                       timeout=60)  # the upstream answers JSON to a stream request: checked the same
        assert r.status_code == 502, r.text
        r = httpx.post(f"{g.base}/api/v1/services/aigc/text-generation/generation", headers=AUTH, timeout=60,
                       json={"model": "m", "input": {"prompt": "x"}, "parameters": {"enable_code_interpreter": True}})
        assert r.status_code == 502 and r.json()["code"] == "InternalError"
    finally:
        g.close()
        up.close()


def _sse(obj):
    return f"data: {json.dumps(obj)}\n\n".encode()


def _events(r):
    return [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:") and line[5:].strip()
            != "[DONE]"]


def test_a_malformed_stream_ends_with_an_error_event_not_a_cut_stream():
    good = _sse({"id": "s", "model": "fake", "choices": [{"index": 0, "delta": {"content": "Hel"}}]})
    bad = _sse({"id": "s", "choices": [{"index": 0, "delta": {"tool_calls": {"index": 0, "id": "x"}}}]})
    no_id = _sse({"id": "s", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"name": "code_interpreter", "arguments": "{}"}}]}}]})
    up = FakeUpstream([raw_sse([good, bad, b"data: [DONE]\n\n"]), raw_sse([good, no_id, b"data: [DONE]\n\n"])])
    g = Running(up.url)
    try:
        for _ in range(2):
            r = httpx.post(f"{g.url}/chat/completions", json={**CHAT, "stream": True}, headers=AUTH, timeout=60)
            events = _events(r)
            assert events[0]["choices"][0]["delta"].get("content") in ("", "Hel", None)
            assert "error" in events[-1] and events[-1]["error"]["type"] == "upstream_error", events[-1]
    finally:
        g.close()
        up.close()


def test_an_endless_upstream_line_is_cut_off_and_not_relayed():
    line = b"data: {\"choices\": [{\"delta\": {\"content\": \"" + b"x" * (1 << 16)
    up = FakeUpstream([raw_sse([line] + [b"x" * (1 << 16)] * 100)])  # 6.5 MB without a newline
    g = Running(up.url)
    try:
        r = httpx.post(f"{g.url}/chat/completions", json={**CHAT, "stream": True}, headers=AUTH, timeout=60)
        # nothing was relayed yet, so the failure is the answer itself (once streaming, an error event)
        assert r.status_code == 502 and "longer than" in r.json()["error"]["message"], r.text[:300]
        assert len(r.content) < 100_000
    finally:
        g.close()
        up.close()


def test_the_upstream_timeout_bounds_a_whole_model_call_however_slowly_tokens_come():
    token = _sse({"id": "s", "choices": [{"index": 0, "delta": {"content": "."}}]})
    up = FakeUpstream([raw_sse([token] * 400, delay=0.05), raw_sse([token] * 400, delay=0.05)])  # 20 s of tokens
    g = Running(up.url, upstream_timeout=1.5)
    try:
        t = time.monotonic()
        r = httpx.post(f"{g.url}/chat/completions", json={**CHAT, "stream": True}, headers=AUTH, timeout=60)
        assert time.monotonic() - t < 6
        assert "within 1.5 s" in _events(r)[-1]["error"]["message"]
        t = time.monotonic()
        r = httpx.post(f"{g.url}/chat/completions", json=CHAT, headers=AUTH, timeout=60)  # the same, not streamed
        assert time.monotonic() - t < 6 and r.status_code == 502 and "within 1.5 s" in r.text
    finally:
        g.close()
        up.close()


def test_a_streaming_client_that_leaves_before_the_first_byte_cancels_the_upstream_call():
    seen = []

    def slow(handler, body):  # answers nothing; notes when the gateway hangs up
        conn = handler.connection
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            readable, _, _ = select.select([conn], [], [], 0.1)
            if readable and conn.recv(1, socket.MSG_PEEK) == b"":
                seen.append("gateway hung up")
                return
        seen.append("still waiting")

    up = FakeUpstream([Raw(slow)])
    g = Running(up.url)
    try:
        with pytest.raises(httpx.ReadTimeout):
            with httpx.stream("POST", f"{g.url}/chat/completions", json={**CHAT, "stream": True}, headers=AUTH,
                              timeout=httpx.Timeout(10, read=1.0)) as r:
                r.read()
        assert wait_for(lambda: seen, 10) and seen == ["gateway hung up"]
    finally:
        g.close()
        up.close()
