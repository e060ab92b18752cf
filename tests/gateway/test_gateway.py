"""`jailcell serve` with real clients (the openai SDK, the dashscope SDK, httpx) and a scripted fake upstream."""

import base64
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from jailcell import Policy
from jailcell.integrations.gateway import MAX_BODY, Gateway

from ..conftest import busiest_cpu_s, wait_for
from ..fake_upstream import FakeUpstream, code_call, function_call, last_tool_output

AUTH = {"Authorization": "Bearer anything"}  # the key Running gives its gateways unless told


def answer(body):
    return {"role": "assistant", "content": f"12 to the power of 3 is {last_tool_output(body).split()[-1]}."}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, upstream_url, policy="minimal", **kwargs):
        kwargs.setdefault("api_key", "anything")
        self.gateway = Gateway(upstream_url, policy=policy, **kwargs)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.gateway.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1"

    def client(self, key="anything"):
        return openai.OpenAI(api_key=key, base_url=self.url, max_retries=0, timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.gateway.containers.items  # the lifespan closed every container


@pytest.fixture
def upstream():
    up = FakeUpstream([{"role": "assistant", "content": None, "tool_calls": [code_call("call_a", "print(12 ** 3)")]},
                       answer])
    yield up
    up.close()


@pytest.fixture
def gateway(upstream):
    g = Running(upstream.url)
    yield g
    g.close()


# -- Responses API ---------------------------------------------------------------------------

def test_hosted_example_responses_api(gateway, upstream):
    response = gateway.client().responses.create(model="qwen", input="What is 12 to the power of 3?",
                                                 tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
                                                 extra_body={"enable_thinking": True},
                                                 include=["code_interpreter_call.outputs"])
    assert "1728" in response.output_text
    call = response.output[0]
    assert call.type == "code_interpreter_call" and call.code == "print(12 ** 3)" and call.status == "completed"
    assert call.container_id.startswith("cntr_") and call.outputs[0].type == "logs" and "1728" in call.outputs[0].logs
    assert response.output[-1].type == "message" and response.status == "completed"
    assert response.usage.total_tokens == 30 and response.usage.input_tokens == 20
    assert upstream.requests[0]["enable_thinking"] is True  # passed through
    assert upstream.requests[0]["tools"][-1]["function"]["name"] == "code_interpreter"


def test_outputs_only_when_included(gateway):
    response = gateway.client().responses.create(model="m", input="12**3?", tools=[{"type": "code_interpreter"}])
    assert response.output[0].outputs is None and response.output[0].code == "print(12 ** 3)"


def test_responses_streaming_events_in_order(gateway):
    client = gateway.client()
    with client.responses.stream(model="m", input="What is 12 to the power of 3?",
                                 tools=[{"type": "code_interpreter"}], include=["code_interpreter_call.outputs"]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    code_events = ["response.output_item.added", "response.code_interpreter_call.in_progress",
                   "response.code_interpreter_call_code.delta", "response.code_interpreter_call_code.done",
                   "response.code_interpreter_call.interpreting", "response.code_interpreter_call.completed",
                   "response.output_item.done"]
    assert kinds[2:9] == code_events
    assert events[4].delta == "print(12 ** 3)" and events[5].code == "print(12 ** 3)"
    assert events[8].item.status == "completed" and "1728" in events[8].item.outputs[0].logs
    text = kinds[9:-1]
    assert text[:2] == ["response.output_item.added", "response.content_part.added"]
    assert text[-3:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 3 and "".join(deltas) == "12 to the power of 3 is 1728."  # upstream tokens streamed through
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "12 to the power of 3 is 1728." and final.usage.total_tokens == 30


def test_previous_response_id_keeps_history_and_container_and_client_tools():
    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    up = FakeUpstream([
        # one turn: our code call and the client's function together
        {"role": "assistant", "content": None,
         "tool_calls": [code_call("c1", "x = 41"), function_call("w1", "get_weather", {"city": "Oslo"})]},
        {"role": "assistant", "content": None, "tool_calls": [code_call("c2", "print(x + 1)")]},
        lambda body: {"role": "assistant", "content": f"x+1 = {last_tool_output(body).split()[-1]}"},
    ])
    g = Running(up.url)
    try:
        client = g.client()
        first = client.responses.create(model="m", input="weather and x", tools=[{"type": "code_interpreter"}, weather])
        kinds = [item.type for item in first.output]
        assert kinds == ["code_interpreter_call", "function_call"], kinds
        fc = first.output[1]
        assert fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Oslo"} and fc.call_id == "w1"
        second = client.responses.create(model="m", previous_response_id=first.id,
                                         input=[{"type": "function_call_output", "call_id": "w1", "output": "sunny"}],
                                         tools=[{"type": "code_interpreter"}, weather])
        assert second.output_text == "x+1 = 42"  # same container: x survived between requests
        assert second.output[0].container_id == first.output[0].container_id
        sent = up.requests[1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
        assert sent[2]["tool_call_id"] == "c1" and sent[3] == {"role": "tool", "tool_call_id": "w1", "content": "sunny"}
        with pytest.raises(openai.NotFoundError, match="previous response"):
            client.responses.create(model="m", previous_response_id="resp_nope", input="x")
    finally:
        g.close()
        up.close()


def test_replayed_output_items_as_input(gateway, upstream):
    """A client that manages history itself sends the previous output back as input items."""
    client = gateway.client()
    first = client.responses.create(model="m", input="12**3?", tools=[{"type": "code_interpreter"}],
                                    include=["code_interpreter_call.outputs"])
    upstream.script.append(lambda body: {"role": "assistant", "content": f"{len(body['messages'])} messages"})
    history = [{"role": "user", "content": "12**3?"}, *[item.model_dump() for item in first.output],
               {"role": "user", "content": "and now?"}]
    second = client.responses.create(model="m", input=history, tools=[{"type": "code_interpreter"}])
    roles = [m["role"] for m in upstream.requests[-1]["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant", "user"] and second.output_text == "5 messages"
    assert "1728" in upstream.requests[-1]["messages"][2]["content"]


def test_timeout_cell_is_reported_and_loop_continues():
    up = FakeUpstream([
        {"role": "assistant", "content": None, "tool_calls": [code_call("c1", "y = 7")]},
        {"role": "assistant", "content": None, "tool_calls": [code_call("c2", "while True: pass")]},
        {"role": "assistant", "content": None, "tool_calls": [code_call("c3", "print(y)")]},
        lambda body: {"role": "assistant", "content": last_tool_output(body)},
    ])
    g = Running(up.url, policy=Policy.load("minimal").with_overrides(timeout=1))
    try:
        response = g.client().responses.create(model="m", input="spin", tools=[{"type": "code_interpreter"}],
                                               include=["code_interpreter_call.outputs"])
        statuses = [item.status for item in response.output if item.type == "code_interpreter_call"]
        assert statuses == ["completed", "failed", "completed"]
        assert "timeout" in response.output[1].outputs[0].logs
        told = [m for m in up.requests[2]["messages"] if m["role"] == "tool"][-1]["content"]
        assert told.startswith("[status: timeout")  # the model is told
        assert response.output_text.strip() == "[stdout]\n7"  # the session survived the runaway cell
    finally:
        g.close()
        up.close()


def test_image_output():
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
    up = FakeUpstream([{"role": "assistant", "content": None, "tool_calls": [code_call("p1", code)]},
                       lambda body: {"role": "assistant", "content": last_tool_output(body)}])
    g = Running(up.url, policy="standard")
    try:
        response = g.client().responses.create(model="m", input="plot", tools=[{"type": "code_interpreter"}],
                                               include=["code_interpreter_call.outputs"])
        images = [o for o in response.output[0].outputs if o.type == "image"]
        assert len(images) == 1 and images[0].url.startswith("data:image/png;base64,")
        assert base64.b64decode(images[0].url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        assert "[image 1: image/png" in response.output_text  # the model is told an image was made
    finally:
        g.close()
        up.close()


def test_step_limit_reported():
    looping = FakeUpstream([{"role": "assistant", "content": None, "tool_calls": [code_call(f"c{i}", "1")]}
                            for i in range(4)])
    g = Running(looping.url, max_steps=2)
    try:
        response = g.client().responses.create(model="m", input="loop", tools=[{"type": "code_interpreter"}])
        assert response.status == "incomplete" and "step limit was reached (2 model calls)" in response.output_text
        assert sum(item.type == "code_interpreter_call" for item in response.output) == 2
        chat = g.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "loop"}],
                                                  tools=[{"type": "code_interpreter"}])
        assert chat.choices[0].finish_reason == "length" and "step limit" in chat.choices[0].message.content
    finally:
        g.close()
        looping.close()


# -- Chat Completions ------------------------------------------------------------------------

def test_chat_completions(gateway):
    out = gateway.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "12**3?"}],
                                                   tools=[{"type": "code_interpreter"}])
    assert "1728" in out.choices[0].message.content and out.choices[0].finish_reason == "stop"
    assert out.usage.total_tokens == 30
    assert out.model_extra["jailcell"]["calls"][0]["code"] == "print(12 ** 3)"


def test_chat_streaming(gateway):
    stream = gateway.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "12**3?"}],
                                                      extra_body={"enable_code_interpreter": True}, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "12 to the power of 3 is 1728."
    calls = [c.model_extra["jailcell"] for c in chunks if (c.model_extra or {}).get("jailcell", {}).get("code")]
    assert [(c["status"], c["code"]) for c in calls] == [("interpreting", "print(12 ** 3)"), ("ok", "print(12 ** 3)")]
    assert calls[1]["stdout"] == "1728\n"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == 30 and not chunks[-1].choices


def test_chat_client_function_tools_and_container_reuse():
    lookup = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    up = FakeUpstream([
        {"role": "assistant", "content": None,
         "tool_calls": [code_call("c1", "total = 5"), function_call("l1", "lookup", {"q": "price"})]},
        {"role": "assistant", "content": None, "tool_calls": [code_call("c2", "print(total * 2)")]},
        lambda body: {"role": "assistant", "content": last_tool_output(body)},
    ])
    g = Running(up.url)
    try:
        client = g.client()
        first = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}],
                                               tools=[{"type": "code_interpreter"}, lookup])
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["lookup"]  # only the client's own call
        container = first.model_extra["jailcell"]["container_id"]
        second = client.chat.completions.create(
            model="m", tools=[{"type": "code_interpreter"}, lookup], extra_body={"container": container},
            messages=[{"role": "user", "content": "go"}, choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": "l1", "content": "3"}])
        assert "10" in second.choices[0].message.content  # `total` from the first request's container
        with pytest.raises(openai.NotFoundError, match="does not exist or has expired"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                           tools=[{"type": "code_interpreter"}], extra_body={"container": "cntr_gone"})
    finally:
        g.close()
        up.close()


def test_containers_are_bounded():
    up = FakeUpstream([{"role": "assistant", "content": None, "tool_calls": [code_call("c", "v = 1")]},
                       {"role": "assistant", "content": "done"}] * 3)
    g = Running(up.url, max_containers=1)
    try:
        client = g.client()
        ask = dict(model="m", messages=[{"role": "user", "content": "x"}], tools=[{"type": "code_interpreter"}])
        first = client.chat.completions.create(**ask).model_extra["jailcell"]["container_id"]
        second = client.chat.completions.create(**ask).model_extra["jailcell"]["container_id"]
        assert first != second and list(g.gateway.containers.items) == [second]  # the idle one was closed
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(**ask, extra_body={"container": first})
    finally:
        g.close()
        up.close()


# -- DashScope native ------------------------------------------------------------------------

def two_calls_then_answer():
    return FakeUpstream([
        {"role": "assistant", "reasoning_content": "compute a", "content": None,
         "tool_calls": [code_call("d1", "a = 123 ** 21")]},
        {"role": "assistant", "content": None, "tool_calls": [code_call("d2", "print(len(str(a)))")]},
        lambda body: {"role": "assistant", "content": f"123**21 has {last_tool_output(body).split()[-1]} digits."},
    ])


def test_dashscope_sse_with_two_code_calls():
    import dashscope

    up = two_calls_then_answer()
    g = Running(up.url)
    try:
        dashscope.base_http_api_url = f"{g.base}/api/v1"
        chunks = list(dashscope.Generation.call(api_key="anything", model="qwen3-max",
                                                messages=[{"role": "user", "content": "digits of 123**21?"}],
                                                enable_code_interpreter=True, enable_thinking=True,
                                                result_format="message", stream=True))
        assert all(c.status_code == 200 for c in chunks) and chunks[-1].request_id
        finishes = [c.output.choices[0].finish_reason for c in chunks]
        assert set(finishes[:-1]) == {"null"} and finishes[-1] == "stop"
        last = chunks[-1]
        assert [t["code_interpreter"]["code"] for t in last.output.tool_info] == ["a = 123 ** 21", "print(len(str(a)))"]
        assert all(t["type"] == "code_interpreter" for t in last.output.tool_info)
        assert last.usage["plugins"]["code_interpreter"]["count"] == 2 and last.usage["total_tokens"] == 45
        assert last.output.choices[0].message.content == "123**21 has 44 digits."  # cumulative text
        assert last.output.choices[0].message.reasoning_content == "compute a"
        infos = [len(c.output.get("tool_info") or []) for c in chunks]
        assert infos == sorted(infos) and infos[-1] == 2  # cumulative across chunks
        assert up.requests[0]["enable_thinking"] is True and up.requests[0]["stream"] is True
    finally:
        g.close()
        up.close()


def test_dashscope_incremental_and_plain_json():
    up = two_calls_then_answer()
    g = Running(up.url)
    url = f"{g.base}/api/v1/services/aigc/text-generation/generation"
    body = {"model": "qwen", "input": {"messages": [{"role": "user", "content": "digits?"}]},
            "parameters": {"enable_code_interpreter": True, "incremental_output": True}}
    try:
        with httpx.stream("POST", url, json=body, headers={"X-DashScope-SSE": "enable", "Authorization": "Bearer anything"},
                          timeout=120) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            data = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        text = "".join(d["output"]["choices"][0]["message"]["content"] for d in data)
        assert text == "123**21 has 44 digits."  # incremental: each chunk carries only new text
        up.script.extend(two_calls_then_answer().script)
        plain = httpx.post(url, json=dict(body, parameters={"enable_code_interpreter": True, "result_format": "text"}),
                           headers={"Authorization": "Bearer anything"}, timeout=120).json()
        assert plain["output"]["text"] == "123**21 has 44 digits." and plain["output"]["finish_reason"] == "stop"
        assert plain["usage"]["plugins"]["code_interpreter"]["count"] == 2 and plain["request_id"]
        bad = httpx.post(url, json={"model": "qwen", "input": {}}, headers={"Authorization": "Bearer anything"},
                         timeout=30)
        assert bad.status_code == 400 and bad.json()["code"] == "InvalidParameter" and "prompt" in bad.json()["message"]
    finally:
        g.close()
        up.close()


# -- errors, limits, concurrency -------------------------------------------------------------

def test_errors_in_openai_format(upstream):
    g = Running(upstream.url, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError, match="--api-key"):
            g.client("wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        good = g.client("sekret")
        with pytest.raises(openai.BadRequestError, match="messages"):
            good.chat.completions.create(model="m", messages=[])
        with pytest.raises(openai.BadRequestError, match="unsupported tool type 'web_search'"):
            good.responses.create(model="m", input="x", tools=[{"type": "web_search"}])
        with pytest.raises(openai.BadRequestError, match="may not be named 'code_interpreter'"):
            good.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=[
                {"type": "function", "function": {"name": "code_interpreter", "parameters": {}}}])
        with pytest.raises(openai.BadRequestError, match="'input'"):
            good.responses.create(model="m", input=[{"type": "mystery"}])
        auth = {"Authorization": "Bearer sekret", "Content-Type": "application/json"}
        r = httpx.post(f"{g.url}/chat/completions", content=b"{not json", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("request body is not valid JSON")
        r = httpx.post(f"{g.url}/responses", content=b" " * (MAX_BODY + 1), headers=auth)
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        r = httpx.post(f"{g.base}/api/v1/services/aigc/text-generation/generation", json={}, headers={})
        assert r.status_code == 401 and r.json()["code"] == "InvalidApiKey"
    finally:
        g.close()


def test_upstream_failures_are_502():
    g = Running(f"http://127.0.0.1:{free_port()}/v1")
    try:
        with pytest.raises(openai.InternalServerError) as info:
            g.client().responses.create(model="m", input="hi", tools=[{"type": "code_interpreter"}])
        assert info.value.status_code == 502 and "upstream" in str(info.value)
    finally:
        g.close()
    failing = FakeUpstream([{"role": "assistant", "content": None, "tool_calls": [code_call("c1", "1")]},
                            (503, "model overloaded"), (500, "boom")])
    g = Running(failing.url, upstream_retries=0)  # (retries: test_transient_upstream_failures_are_retried)
    try:
        events = list(g.client().responses.create(model="m", input="hi", tools=[{"type": "code_interpreter"}],
                                                  stream=True))
        assert [e.type for e in events[-2:]] == ["error", "response.failed"]  # mid-stream: error events
        assert "model overloaded" in events[-2].message and events[-1].response.status == "failed"
        with pytest.raises(openai.InternalServerError, match="boom") as info:  # before the stream: HTTP 502
            g.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        assert info.value.status_code == 502
    finally:
        g.close()
        failing.close()


def conversational(body):
    """Stateless script: set x from the question, then square it, then answer with the tool output."""
    tools = [m for m in body["messages"] if m["role"] == "tool"]
    n = int(body["messages"][0]["content"].split()[-1])
    if not tools:
        return {"role": "assistant", "content": None, "tool_calls": [code_call("c1", f"x = {n}")]}
    if len(tools) == 1:
        return {"role": "assistant", "content": None, "tool_calls": [code_call("c2", "x ** 2")]}
    return {"role": "assistant", "content": f"square: {tools[-1]['content'].split()[-1]}"}


def test_twenty_concurrent_conversations_do_not_share_sessions():
    upstream = FakeUpstream([conversational] * 60)
    g = Running(upstream.url)
    try:
        client = g.client()

        def ask(n):
            r = client.responses.create(model="m", input=f"square of {n}", tools=[{"type": "code_interpreter"}],
                                        stream=n % 2 == 0)
            if n % 2 == 0:
                return n, [e for e in r if e.type == "response.completed"][0].response.output_text
            return n, r.output_text

        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(ask, range(100, 120)))
        assert all(text == f"square: {n * n}" for n, text in answers), answers
        assert len(g.gateway.containers.items) == 20
    finally:
        g.close()
        upstream.close()


def test_wire_objects_validate_strictly_against_the_sdk_types():
    """Every object the gateway sends validates against the openai SDK's own pydantic models (not just
    the SDK's lenient construction, which turns an object it cannot validate into a plain dict)."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    plot = "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()\nprint('drawn')"
    script = [{"role": "assistant", "reasoning_content": "a plot, then the weather", "content": None,
               "tool_calls": [code_call("p1", plot)]},
              {"role": "assistant", "content": "thinking", "tool_calls": [function_call("w1", "get_weather", {})]}]
    up = FakeUpstream(script * 2 + [{"role": "assistant", "content": None, "tool_calls": [code_call("p2", plot)]},
                                    lambda body: {"role": "assistant", "content": "done"}] * 2)
    g = Running(up.url, policy="standard")
    events = TypeAdapter(ResponseStreamEvent)
    body = {"model": "m", "input": "plot", "tools": [{"type": "code_interpreter"}, weather],
            "include": ["code_interpreter_call.outputs"]}
    try:
        with httpx.Client(base_url=g.base, headers=AUTH, timeout=120) as http:
            Response.model_validate(http.post("/v1/responses", json=body).json())
            with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
                data = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
            parsed = [events.validate_python(d) for d in data]
            assert parsed[-1].type == "response.completed" and parsed[-1].response.output[-1].type == "function_call"
            thought = [e for e in parsed if e.type == "response.reasoning_text.delta"]  # reasoning streams through
            assert "".join(e.delta for e in thought) == "a plot, then the weather"
            assert parsed[-1].response.output[0].type == "reasoning"
            assert parsed[-1].response.output[0].content[0].text == "a plot, then the weather"
            assert parsed[-1].response.tools[0].container.startswith("cntr_")
            chat = {"model": "m", "messages": [{"role": "user", "content": "plot"}], "tools": [{"type": "code_interpreter"}]}
            ChatCompletion.model_validate(http.post("/v1/chat/completions", json=chat).json())
            with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
                lines = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
            assert lines[-1] == "[DONE]"
            chunks = [ChatCompletionChunk.model_validate(json.loads(x)) for x in lines[:-1]]
            assert chunks[-1].usage.total_tokens == 30
    finally:
        g.close()
        up.close()


def test_the_cli_server_end_to_end_and_graceful_shutdown():
    """`jailcell serve` as users start it: the hosted example through it, its API key, and a clean exit."""
    import signal
    import subprocess
    import sys

    from ..conftest import jail_processes

    up = FakeUpstream([{"role": "assistant", "content": None, "tool_calls": [code_call("c1", "print(12 ** 3)")]},
                       answer])
    port = free_port()
    before = set(jail_processes())
    # Keys from the environment (flags show up in `ps`); the client's model name mapped for the upstream.
    env = {**os.environ, "JAILCELL_API_KEY": "sekret", "JAILCELL_UPSTREAM_API_KEY": "up-key", "OPENAI_API_KEY": "no"}
    proc = subprocess.Popen([sys.executable, "-m", "jailcell", "serve", "--upstream", up.url, "--port", str(port),
                             "--policy", "minimal", "--model-map", "m=fake-model"], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert wait_for(lambda: _listening(port), 60), proc.stderr.read() if proc.poll() is not None else "not up"
        client = openai.OpenAI(api_key="sekret", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        response = client.responses.create(model="m", input="What is 12 to the power of 3?",
                                           tools=[{"type": "code_interpreter"}], extra_body={"enable_thinking": True})
        assert "1728" in response.output_text and response.output[0].code == "print(12 ** 3)"
        assert up.requests[0]["enable_thinking"] is True and up.requests[0]["model"] == "fake-model"
        assert up.headers[0]["Authorization"] == "Bearer up-key"  # JAILCELL_UPSTREAM_API_KEY before OPENAI_API_KEY
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="wrong", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0).models.list()
        assert set(jail_processes()) - before  # the conversation's container is alive
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert wait_for(lambda: not set(jail_processes()) - before, 10)  # shutdown left no jail behind
        logged = proc.stderr.read() + proc.stdout.read()
        start = next(line for line in logged.splitlines() if "jailcell serve:" in line)
        assert f"http://127.0.0.1:{port}/v1" in start and up.url in start and "'minimal'" in start, start
        # one access line per request, with its request id (and the key's name, where keys have names)
        assert re.search(r"gateway POST /v1/responses 200 [\d.]+s request_id=req_\S+ who=-", logged), logged
        assert re.search(r"gateway GET /v1/models 401 ", logged) and "HTTP/1.1" not in logged, logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        up.close()


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_a_client_that_goes_away_mid_stream_frees_its_container():
    def step(body):
        if not [m for m in body["messages"] if m["role"] == "tool"]:
            return {"role": "assistant", "content": None,
                    "tool_calls": [code_call("c1", "import time\ntime.sleep(1)\nprint('slow')")]}
        return {"role": "assistant", "content": "done " + last_tool_output(body)}

    up = FakeUpstream([step] * 6)
    g = Running(up.url, max_containers=1)
    body = {"model": "m", "input": "x", "tools": [{"type": "code_interpreter"}]}
    try:
        with httpx.Client(base_url=g.base, headers=AUTH, timeout=60) as http:
            with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
                for line in r.iter_lines():
                    if "code_interpreter_call.interpreting" in line:
                        break  # the client disconnects while its code runs
            assert wait_for(lambda: all(busy == 0 for _, busy in g.gateway.containers.items.values()), 10)
            r = http.post("/v1/responses", json=body)  # the only container slot is free again
            assert r.status_code == 200 and r.json()["output"][-1]["content"][0]["text"] == "done [stdout]\nslow"
    finally:
        g.close()
        up.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_stops_its_code_at_once(stream):
    """Whether the client streams or waits for the whole answer: when it disconnects, the code it
    started is killed (not left spinning until its 60 s limit) and its container keeps its state."""
    up = FakeUpstream([{"role": "assistant", "content": None, "tool_calls": [code_call("c0", "x = 5")]},
                       {"role": "assistant", "content": "ready"},
                       {"role": "assistant", "content": None, "tool_calls": [code_call("c1", "x = 6\nwhile True: pass")]},
                       {"role": "assistant", "content": None, "tool_calls": [code_call("c2", "print(x)")]},
                       lambda body: {"role": "assistant", "content": last_tool_output(body)}])
    g = Running(up.url, policy=Policy.load("minimal").with_overrides(timeout=60))
    tools = [{"type": "code_interpreter"}]
    try:
        with httpx.Client(base_url=g.base, headers=AUTH, timeout=60) as http:
            first = http.post("/v1/responses", json={"model": "m", "input": "x", "tools": tools}).json()
            container = first["output"][0]["container_id"]
            session = g.gateway.containers.items[container][0]
            jail_pid = session._sync._shared.jail.pid
            body = {"model": "m", "input": "spin", "tools": [{"type": "code_interpreter", "container": container}],
                    "stream": stream}
            try:
                with httpx.Client(base_url=g.base, headers=AUTH, timeout=1.5) as impatient:
                    with impatient.stream("POST", "/v1/responses", json=body) as r:
                        for _line in r.iter_lines():
                            pass
            except httpx.TimeoutException:
                pass  # the client gives up and closes its connection while the code spins
            assert wait_for(lambda: g.gateway.containers.items[container][1] == 0, 10)
            assert busiest_cpu_s(jail_pid) < 0.2  # the spinning cell is gone
            last = http.post("/v1/responses", json={**body, "stream": False}).json()
            assert last["output"][-1]["content"][0]["text"] == "[stdout]\n5"  # the state from before the killed run
    finally:
        g.close()
        up.close()


def test_transient_upstream_failures_are_retried_and_the_rest_named():
    """One pooled client for the process: a 503 or 429 with Retry-After is tried again (the caller
    never sees it), a refused model is a 502 that names it and says how to map it, and an upstream
    that stays down is a 502 after the retries, not a hang."""
    up = FakeUpstream([(503, "warming up", {"Retry-After": "0"}), (429, "slow down", {"Retry-After": "0.2"}),
                       {"role": "assistant", "content": "fine"},
                       (404, "model 'qwen3-max' not found, try pulling it first"),
                       (503, "down"), (503, "down"), (503, "down")])
    g = Running(up.url, upstream_retries=2)
    try:
        client = g.client()
        t0 = time.monotonic()
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert r.choices[0].message.content == "fine" and len(up.requests) == 3
        assert time.monotonic() - t0 >= 0.2  # Retry-After was honoured
        with pytest.raises(openai.InternalServerError) as info:
            client.responses.create(model="qwen3-max", input="x", tools=[{"type": "code_interpreter"}])
        message = str(info.value)
        assert info.value.status_code == 502 and "qwen3-max" in message and "--model-map" in message
        with pytest.raises(openai.InternalServerError, match="answered 503"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert len(up.requests) == 7  # 1 + 2 retries for the last one; the 404 was not retried
    finally:
        g.close()
        up.close()


def test_model_names_are_mapped_and_models_listed_from_the_upstream():
    up = FakeUpstream([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
                      models=["qwen2.5:7b", "llama3"])
    g = Running(up.url, model_map={"qwen3-max": "qwen2.5:7b", "gpt-x": "missing"})
    try:
        client = g.client()
        client.chat.completions.create(model="qwen3-max", messages=[{"role": "user", "content": "x"}])
        client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "x"}])
        assert [r["model"] for r in up.requests] == ["qwen2.5:7b", "llama3"]  # mapped; others as sent
        listed = {m.id: m for m in client.models.list()}
        assert set(listed) == {"qwen2.5:7b", "llama3", "qwen3-max", "gpt-x"}
        assert listed["qwen3-max"].jailcell == {"usable": True, "sent_upstream_as": "qwen2.5:7b"}
        assert listed["gpt-x"].jailcell["usable"] is False  # maps to a name the upstream does not have
    finally:
        g.close()
        up.close()


def test_an_upstream_that_never_answers_is_a_502_after_the_timeout_not_a_hang():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections (the kernel does) and never answers
    g = Running(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", upstream_timeout=1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError, match="did not finish the model call within 1 s") as info:
            g.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 502 and time.monotonic() - t0 < 10
    finally:
        g.close()
        silent.close()
