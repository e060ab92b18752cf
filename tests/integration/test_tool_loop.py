"""run_tool_loop with the real openai SDK against a scripted fake OpenAI-compatible upstream
(no model weights here): the upstream's scripted replies are tool calls, then an answer."""

import asyncio

import openai
import pytest

from jailcell.integrations.tools import arun_tool_loop, run_tool_loop, tool_definition

from ..fake_upstream import FakeUpstream, code_call


def answer_from_tool_output(body):
    tool_msgs = [m for m in body["messages"] if m["role"] == "tool"]
    return {"role": "assistant", "content": f"The answer is {tool_msgs[-1]['content'].split()[-1]}"}


@pytest.fixture
def script():
    upstream = FakeUpstream([
        {"role": "assistant", "content": None, "tool_calls": [code_call("call_1", "x = 12 ** 3\nprint(x)")]},
        {"role": "assistant", "content": None, "tool_calls": [code_call("call_2", "x + 0")]},
        answer_from_tool_output,
    ])
    yield upstream
    upstream.close()


def test_loop_with_openai_client(script, minimal):
    client = openai.OpenAI(api_key="test", base_url=script.url)
    out = run_tool_loop(client, "fake", [{"role": "user", "content": "What is 12 to the power of 3?"}], sandbox=minimal)
    assert out.stopped == "answer" and out.message["content"] == "The answer is 1728"
    assert [c.code for c in out.calls] == ["x = 12 ** 3\nprint(x)", "x + 0"]  # state kept between calls
    assert out.calls[1].result.result == "1728"
    assert out.usage == {"prompt_tokens": 30, "completion_tokens": 15, "total_tokens": 45}
    first = script.requests[0]
    assert first["tools"][-1] == tool_definition("chat")
    tool_msg = [m for m in script.requests[1]["messages"] if m["role"] == "tool"][0]
    assert tool_msg["tool_call_id"] == "call_1" and "1728" in tool_msg["content"]


def test_async_loop(script, minimal):
    async def main():
        client = openai.AsyncOpenAI(api_key="test", base_url=script.url)
        return await arun_tool_loop(client, "fake", [{"role": "user", "content": "12**3?"}], sandbox=minimal)

    out = asyncio.run(main())
    assert out.message["content"] == "The answer is 1728" and len(out.calls) == 2


def test_timeout_is_reported_and_loop_continues():
    from jailcell import Sandbox

    upstream = FakeUpstream([
        {"role": "assistant", "content": None, "tool_calls": [code_call("c1", "while True: pass")]},
        lambda body: {"role": "assistant", "content": [m for m in body["messages"] if m["role"] == "tool"][0]["content"]},
    ])
    try:
        client = openai.OpenAI(api_key="t", base_url=upstream.url)
        with Sandbox("minimal", timeout=1) as sb:
            out = run_tool_loop(client, "fake", [{"role": "user", "content": "loop"}], sandbox=sb)
    finally:
        upstream.close()
    assert out.calls[0].result.status == "timeout"
    assert "[status: timeout" in out.message["content"]


def test_client_tools_and_bad_arguments_and_step_limit(minimal):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
    upstream = FakeUpstream([
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "b1", "type": "function", "function": {"name": "code_interpreter", "arguments": "not json"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "w1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
    ])
    try:
        client = openai.OpenAI(api_key="t", base_url=upstream.url)
        out = run_tool_loop(client, "fake", [{"role": "user", "content": "weather?"}], sandbox=minimal, tools=[weather])
        assert out.stopped == "client_tool_calls" and out.message["tool_calls"][0]["function"]["name"] == "get_weather"
        bad = [m for m in upstream.requests[1]["messages"] if m["role"] == "tool"][0]
        assert "arguments must be JSON" in bad["content"]
        assert [t["function"]["name"] for t in upstream.requests[0]["tools"]] == ["get_weather", "code_interpreter"]
    finally:
        upstream.close()
    forever = FakeUpstream([{"role": "assistant", "content": None, "tool_calls": [code_call(f"c{i}", "1")]} for i in range(3)])
    try:
        out = run_tool_loop(openai.OpenAI(api_key="t", base_url=forever.url), "fake", [{"role": "user", "content": "x"}],
                            sandbox=minimal, max_steps=3)
        assert out.stopped == "max_steps" and len(out.calls) == 3
    finally:
        forever.close()


def test_tool_definitions():
    assert tool_definition("responses")["name"] == "code_interpreter"
    assert tool_definition("anthropic")["input_schema"]["required"] == ["code"]
    with pytest.raises(ValueError, match="anthropic"):
        tool_definition("nope")
