"""`jailcell serve` with the real openai SDK as the client and a scripted fake upstream."""

import socket
import threading
import time

import openai
import pytest
import uvicorn

from jailcell.integrations.gateway import Gateway

from ..fake_upstream import FakeUpstream, code_call


def answer(body):
    tool = [m for m in body["messages"] if m["role"] == "tool"][-1]["content"]
    return {"role": "assistant", "content": f"12 to the power of 3 is {tool.split()[-1]}."}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, upstream_url, **kwargs):
        self.gateway = Gateway(upstream_url, policy="minimal", **kwargs)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.gateway.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


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


def test_hosted_example_responses_api(gateway, upstream):
    client = openai.OpenAI(api_key="anything", base_url=gateway.url, max_retries=0)
    response = client.responses.create(model="qwen", input="What is 12 to the power of 3?",
                                       tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
                                       extra_body={"enable_thinking": True},
                                       include=["code_interpreter_call.outputs"])
    assert "1728" in response.output_text
    call = response.output[0]
    assert call.type == "code_interpreter_call" and call.code == "print(12 ** 3)" and call.status == "completed"
    assert call.container_id.startswith("cntr_") and call.outputs[0].type == "logs" and "1728" in call.outputs[0].logs
    assert response.output[-1].type == "message"
    assert response.usage.total_tokens == 30 and response.usage.input_tokens == 20
    assert upstream.requests[0]["enable_thinking"] is True  # passed through
    assert upstream.requests[0]["tools"][-1]["function"]["name"] == "code_interpreter"


def test_chat_completions(gateway):
    client = openai.OpenAI(api_key="anything", base_url=gateway.url, max_retries=0)
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "12**3?"}],
                                         tools=[{"type": "code_interpreter"}])
    assert "1728" in out.choices[0].message.content and out.choices[0].finish_reason == "stop"
    assert out.usage.total_tokens == 30
    assert out.model_extra["jailcell"]["calls"][0]["code"] == "print(12 ** 3)"


def test_enable_code_interpreter_flag(gateway):
    client = openai.OpenAI(api_key="anything", base_url=gateway.url, max_retries=0)
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "12**3?"}],
                                         extra_body={"enable_code_interpreter": True})
    assert "1728" in out.choices[0].message.content


def test_errors_in_openai_format(upstream):
    g = Running(upstream.url, api_key="sekret")
    try:
        bad = openai.OpenAI(api_key="wrong", base_url=g.url, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        good = openai.OpenAI(api_key="sekret", base_url=g.url, max_retries=0)
        with pytest.raises(openai.BadRequestError, match="messages"):
            good.chat.completions.create(model="m", messages=[])
        with pytest.raises(openai.BadRequestError, match="stream=true"):
            good.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        with pytest.raises(openai.BadRequestError, match="unsupported tool type"):
            good.responses.create(model="m", input="x", tools=[{"type": "web_search"}])
        import httpx

        r = httpx.post(f"{g.url}/chat/completions", content=b"{not json", headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("request body is not valid JSON")
    finally:
        g.close()


def test_upstream_down_is_502():
    g = Running(f"http://127.0.0.1:{free_port()}/v1")
    try:
        client = openai.OpenAI(api_key="x", base_url=g.url, max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.responses.create(model="m", input="hi", tools=[{"type": "code_interpreter"}])
        assert info.value.status_code == 502 and "upstream" in str(info.value)
    finally:
        g.close()


def test_step_limit_reported():
    looping = FakeUpstream([{"role": "assistant", "content": None, "tool_calls": [code_call(f"c{i}", "1")]} for i in range(2)])
    g = Running(looping.url, max_steps=2)
    try:
        client = openai.OpenAI(api_key="x", base_url=g.url, max_retries=0)
        response = client.responses.create(model="m", input="loop", tools=[{"type": "code_interpreter"}])
        assert response.status == "incomplete" and "stopped after 2 model steps" in response.output_text
        assert sum(item.type == "code_interpreter_call" for item in response.output) == 2
    finally:
        g.close()
        looping.close()


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
    from concurrent.futures import ThreadPoolExecutor

    upstream = FakeUpstream([conversational] * 60)
    g = Running(upstream.url)
    try:
        client = openai.OpenAI(api_key="x", base_url=g.url, max_retries=0, timeout=120)

        def ask(n):
            r = client.responses.create(model="m", input=f"square of {n}", tools=[{"type": "code_interpreter"}])
            return n, r.output_text

        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(ask, range(100, 120)))
        assert all(text == f"square: {n * n}" for n, text in answers), answers
    finally:
        g.close()
        upstream.close()
