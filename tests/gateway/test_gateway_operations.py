"""`jailcell serve` as operators run it: /metrics scraped with prometheus_client's own parser after a
scripted conversation, the audit log, /healthz and /readyz, named keys with limits, request ids.
Real openai SDK and httpx clients, a scripted fake upstream, real jails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..fake_upstream import FakeUpstream, code_call, last_tool_output
from .test_gateway import AUTH, Running

ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789abc"


def code_then_answer(code="print(6 * 7)"):
    return [{"role": "assistant", "content": None, "tool_calls": [code_call("call_1", code)]},
            lambda body: {"role": "assistant", "content": f"it printed {last_tool_output(body).split()[-1]}"}]


def scrape(base: str, key: str = "anything") -> dict[tuple[str, tuple], float]:
    r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:300]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def ask(client, **extra):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "6*7?"}],
                                          tools=[{"type": "code_interpreter"}], **extra)


def test_metrics_move_by_exactly_what_a_conversation_did():
    upstream = FakeUpstream([*code_then_answer(), *code_then_answer("1/0")])
    g = Running(upstream.url)
    try:
        before = scrape(g.base)
        assert "42" in ask(g.client()).choices[0].message.content
        ask(g.client())
        assert "ZeroDivisionError" in upstream.requests[-1]["messages"][-1]["content"]
        after = scrape(g.base)
        policy, backend = "minimal", g.gateway.sandbox.isolation["backend"]
        assert moved(before, after, "jailcell_runs_total", policy=policy, status="ok", backend=backend) == 1
        assert moved(before, after, "jailcell_runs_total", policy=policy, status="error", backend=backend) == 1
        assert moved(before, after, "jailcell_http_requests_total", service="gateway", route="/v1/chat/completions",
                     status="200") == 2
        assert moved(before, after, "jailcell_http_requests_total", service="gateway", route="/metrics",
                     status="200") == 1  # the first scrape
        assert moved(before, after, "jailcell_upstream_requests_total", status="200") == 4
        assert moved(before, after, "jailcell_upstream_request_duration_seconds_count") == 4
        assert after[("jailcell_containers_open", ())] >= 1
        # a refused request is counted under its status and route template, never its path or id
        httpx.get(f"{g.url}/containers/cntr_secret123/files", headers=AUTH)
        httpx.post(f"{g.url}/chat/completions", json={}, headers={"Authorization": "Bearer wrong"})
        last = scrape(g.base)
        assert moved(after, last, "jailcell_http_requests_total", service="gateway",
                     route="/v1/containers/{container_id}/files", status="404") == 1
        assert moved(after, last, "jailcell_http_requests_total", service="gateway", route="/v1/chat/completions",
                     status="401") == 1
        assert not any("cntr_secret123" in str(labels) for _, labels in last)
        # /metrics needs a key, as the API does
        assert httpx.get(f"{g.base}/metrics").status_code == 401
    finally:
        g.close()
        upstream.close()


def test_audit_lines_name_the_request_the_key_and_the_container(tmp_path, monkeypatch):
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("JAILCELL_AUDIT_LOG", str(log))
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[key]]\nname = "alice"\nkey = "{ALICE}"\n')
    upstream = FakeUpstream(code_then_answer())
    g = Running(upstream.url, api_key=None, keys=str(keys))
    try:
        r = httpx.post(f"{g.url}/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {ALICE}", "X-Request-Id": "trace-7f3a"},
                       json={"model": "m", "messages": [{"role": "user", "content": "6*7?"}],
                             "tools": [{"type": "code_interpreter"}]})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-7f3a"
        container = r.json()["jailcell"]["container_id"]
        # refused requests leave no audit line: a wrong key, a bad body
        assert httpx.post(f"{g.url}/chat/completions", json={}, headers={"Authorization": "Bearer no"}).status_code == 401
        bad = httpx.post(f"{g.url}/chat/completions", json={"messages": 5}, headers={"Authorization": f"Bearer {ALICE}"})
        assert bad.status_code == 400 and bad.json()["error"]["request_id"] == bad.headers["x-request-id"]
    finally:
        g.close()
        upstream.close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["request_id"] == "trace-7f3a" and line["who"] == "alice" and line["conversation"] == container
    assert line["status"] == "ok" and line["session"] and "code" not in line
    assert ALICE not in log.read_text()  # the key itself is never written


def test_healthz_and_readyz_follow_the_upstream_without_telling_details():
    upstream = FakeUpstream([])
    g = Running(upstream.url)
    try:
        assert httpx.get(f"{g.base}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{g.base}/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        upstream.close()
        import time

        time.sleep(2.1)  # past the readiness cache
        down = httpx.get(f"{g.base}/readyz")
        assert down.status_code == 503 and down.json() == {"status": "not ready"}
        assert "127.0.0.1" not in down.text and "upstream" not in down.text
        assert httpx.get(f"{g.base}/healthz").status_code == 200  # it still serves
    finally:
        g.close()


def test_named_keys_have_their_own_limits_containers_and_policy(tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[key]]\nname = "alice"\nkey = "{ALICE}"\nruns_per_minute = 1\nmax_containers = 1\n\n'
                    f'[[key]]\nname = "bob"\nkey = "{BOB}"\npolicy = "standard"\n')
    upstream = FakeUpstream([*code_then_answer(), *code_then_answer("import numpy; print(numpy.__name__)"),
                             *code_then_answer()])
    g = Running(upstream.url, api_key=None, keys=str(keys))
    alice, bob = g.client(ALICE), g.client(BOB)
    try:
        first = ask(alice)
        alice_container = first.model_extra["jailcell"]["container_id"]
        with pytest.raises(openai.RateLimitError) as over:  # one run a minute: the second request waits
            ask(alice)
        retry = int(over.value.response.headers["retry-after"])
        assert 1 <= retry <= 60 and over.value.response.json()["error"]["code"] == "rate_limit_exceeded"
        served = ask(bob)  # another key is served meanwhile, under its own policy (numpy is in standard)
        assert "numpy" in served.choices[0].message.content
        # containers belong to their key: bob cannot use or list alice's
        with pytest.raises(openai.NotFoundError):
            ask(bob, extra_body={"container": alice_container})
        files = httpx.get(f"{g.url}/containers/{alice_container}/files", headers={"Authorization": f"Bearer {BOB}"})
        assert files.status_code == 404
        own = httpx.get(f"{g.url}/containers/{alice_container}/files", headers={"Authorization": f"Bearer {ALICE}"})
        assert own.status_code == 200
        assert [k.name for k in g.gateway.keys.keys] == ["alice", "bob"]
        assert all(len(k.digest) == 32 for k in g.gateway.keys.keys)  # kept hashed
        limited = scrape(g.base, BOB)
        assert limited[("jailcell_rate_limited_requests_total", (("key", "alice"), ("limit", "runs_per_minute")))] == 1
        assert limited[("jailcell_key_runs_total", (("key", "bob"),))] >= 1
    finally:
        g.close()
        upstream.close()


def test_a_key_over_its_container_cap_gets_429_with_retry_after(tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[key]]\nname = "alice"\nkey = "{ALICE}"\nmax_containers = 1\n')
    upstream = FakeUpstream([*code_then_answer(), *code_then_answer()])
    g = Running(upstream.url, api_key=None, keys=str(keys), container_idle=30)
    try:
        first = ask(g.client(ALICE))
        with pytest.raises(openai.RateLimitError) as over:  # a second container while the first lives
            ask(g.client(ALICE))
        assert over.value.response.json()["error"]["code"] == "too_many_containers"
        assert 1 <= int(over.value.response.headers["retry-after"]) <= 30
        # reusing its container is fine
        again = ask(g.client(ALICE), extra_body={"container": first.model_extra["jailcell"]["container_id"]})
        assert again.model_extra["jailcell"]["container_id"] == first.model_extra["jailcell"]["container_id"]
    finally:
        g.close()
        upstream.close()


def test_request_ids_are_taken_when_sane_and_made_otherwise():
    upstream = FakeUpstream([])
    g = Running(upstream.url)
    try:
        made = httpx.get(f"{g.url}/models", headers=AUTH)
        assert made.headers["x-request-id"].startswith("req_")
        odd = httpx.get(f"{g.url}/models", headers={**AUTH, "X-Request-Id": "a b<script>" + "x" * 300})
        assert odd.headers["x-request-id"].startswith("req_")
        kept = httpx.get(f"{g.base}/healthz", headers={"X-Request-Id": "lb-42:9"})
        assert kept.headers["x-request-id"] == "lb-42:9"
        refused = httpx.post(f"{g.url}/chat/completions", json={}, headers={"X-Request-Id": "r-1"})
        assert refused.status_code == 401 and refused.json()["error"]["request_id"] == "r-1"
    finally:
        g.close()
        upstream.close()


@pytest.mark.parametrize("content, says", [
    ('[[key]]\nname = "a"\nkey = "short"\n', "at least 16 characters"),
    ('[[key]]\nname = "a b"\nkey = "0123456789abcdef"\n', "name must be"),
    ('[[key]]\nname = "a"\nkey = "0123456789abcdef"\nrpm = 3\n', "unknown field rpm"),
    ('[[key]]\nname = "a"\nsha256 = "xyz"\n', "64 hex digits"),
    ('[[key]]\nname = "a"\nkey = "0123456789abcdef"\nruns_per_minute = 0\n', "positive integer"),
    ('[[key]]\nname = "a"\nkey = "0123456789abcdef"\n[[key]]\nname = "b"\nkey = "0123456789abcdef"\n',
     "same key as another"),
    ("[key]\nname = 1\n", "expected [[key]] tables"),
])
def test_a_bad_keys_file_is_a_usage_error_naming_what_is_wrong(tmp_path, content, says):
    keys = tmp_path / "keys.toml"
    keys.write_text(content)
    r = subprocess.run([sys.executable, "-m", "jailcell", "serve", "--upstream", "http://127.0.0.1:9/v1", "--keys",
                        str(keys), "--port", "9"], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "JAILCELL_API_KEY"})
    assert r.returncode == 2 and says in r.stderr and str(keys) in r.stderr, r.stderr


def test_a_container_keeps_its_open_files_and_random_stream_across_requests():
    """Issue 32 through the gateway: a file opened in one request's code is written in the next, and
    random.seed in one continues in the next (a container is a session)."""
    upstream = FakeUpstream([*code_then_answer("import random\nrandom.seed(1)\nnotes = open('notes.txt', 'w')\nprint(1)"),
                             *code_then_answer("other = open('other.txt', 'w')\nnotes.write('kept'); notes.flush()\n"
                                               "print(round(random.random(), 6))")])
    g = Running(upstream.url)
    try:
        first = ask(g.client())
        container = first.model_extra["jailcell"]["container_id"]
        ask(g.client(), extra_body={"container": container})
        assert "0.134364" in last_tool_output(upstream.requests[-1])
        files = {f["path"]: f["id"] for f in httpx.get(f"{g.url}/containers/{container}/files", headers=AUTH).json()["data"]}
        content = httpx.get(f"{g.url}/containers/{container}/files/{files['notes.txt']}/content", headers=AUTH)
        assert content.content == b"kept"
        other = httpx.get(f"{g.url}/containers/{container}/files/{files['other.txt']}/content", headers=AUTH)
        assert other.content == b""
    finally:
        g.close()
        upstream.close()
