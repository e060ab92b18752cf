"""The framework adapters, driven by the real frameworks (scripted models stand in for LLMs)."""

import asyncio
import subprocess
import sys
import time

import pytest

# -- smolagents -------------------------------------------------------------------------------
from smolagents import CodeAgent, Tool
from smolagents.models import ChatMessage, MessageRole, Model

from jailcell.integrations.smolagents import JailcellExecutor

HOST_SIDE = []


class WeatherTool(Tool):
    name = "get_weather"
    description = "Current temperature of a city in Celsius."
    inputs = {"city": {"type": "string", "description": "the city"}}
    output_type = "number"

    def forward(self, city):
        HOST_SIDE.append(city)  # proves the tool ran on the host, not in the jail
        return {"Oslo": -3.5, "Lima": 19.0}[city]


class ScriptedModel(Model):
    """Emits the scripted code actions in order, the way an LLM answers a CodeAgent."""

    def __init__(self, actions):
        super().__init__(model_id="scripted")
        self.actions, self.seen = list(actions), []

    def generate(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None, **kwargs):
        self.seen.append(messages)
        code = self.actions.pop(0)
        return ChatMessage(role=MessageRole.ASSISTANT, content=f"Thought: next step.\n<code>\n{code}\n</code>")


def test_smolagents_code_agent_with_host_tool_and_final_answer():
    model = ScriptedModel([
        "temps = {c: get_weather(city=c) for c in ['Oslo', 'Lima']}\nprint(temps)",
        "import os\nprint(os.getpid() != 1 and 'jailed')",  # an error step: os is blocked by the policy
        "spread = temps['Lima'] - temps['Oslo']\nfinal_answer(f'spread {spread}')",
    ])
    executor = JailcellExecutor("minimal")
    agent = CodeAgent(tools=[WeatherTool()], model=model, executor=executor, max_steps=5)
    try:
        answer = agent.run("What is the temperature spread between Oslo and Lima?")
        assert answer == "spread 22.5"
        assert HOST_SIDE[-2:] == ["Oslo", "Lima"]
        steps = [s for s in agent.memory.steps if hasattr(s, "observations")]
        assert "{'Oslo': -3.5, 'Lima': 19.0}" in steps[0].observations
        assert "blocked by policy" in str(steps[1].error)  # the model is told, the agent goes on
    finally:
        agent.cleanup()
    assert executor.sandbox._closed


def test_smolagents_executor_state_values_and_variables():
    executor = JailcellExecutor("minimal")
    try:
        executor.send_tools({})
        executor.send_variables({"data": [1, 2, 3], "name": "x"})
        out = executor("total = sum(data)\ntotal * 2")
        assert out.output == 12 and not out.is_final_answer  # a Python value, not a repr string
        out = executor("print(name); {'t': total}")
        assert out.output == {"t": 6} and out.logs == "x\n"
        from smolagents.local_python_executor import InterpreterError

        with pytest.raises(InterpreterError, match="ZeroDivisionError"):
            executor("1 / 0")
        with pytest.raises(Exception, match="JSON"):
            executor.send_variables({"s": {1, 2}})
    finally:
        executor.cleanup()


# -- AutoGen ----------------------------------------------------------------------------------

from autogen_agentchat.agents import ApprovalResponse, CodeExecutorAgent  # noqa: E402
from autogen_agentchat.messages import TextMessage  # noqa: E402
from autogen_core import CancellationToken  # noqa: E402
from autogen_core.code_executor import CodeBlock  # noqa: E402

from jailcell.integrations.autogen import JailcellCodeExecutor  # noqa: E402


async def test_autogen_code_executor_agent():
    async with JailcellCodeExecutor("minimal") as executor:
        approved = []

        def approve(request):
            approved.append(request.code)
            return ApprovalResponse(approved=True, reason="the code runs in jailcell")

        agent = CodeExecutorAgent("runner", code_executor=executor, approval_func=approve)
        reply = await agent.on_messages(
            [TextMessage(content="```python\nx = 6 * 7\nprint(x)\n```", source="user")], CancellationToken())
        assert "42" in reply.chat_message.content
        reply = await agent.on_messages(
            [TextMessage(content="```python\nprint(x + 1)\n```", source="user")], CancellationToken())
        assert "43" in reply.chat_message.content  # state kept across calls
        assert len(approved) == 2


async def test_autogen_executor_semantics():
    executor = JailcellCodeExecutor("minimal", timeout=5)
    await executor.start()
    try:
        token = CancellationToken()
        r = await executor.execute_code_blocks([CodeBlock("a = 1\nprint('one')", "python"),
                                                CodeBlock("print(a + 1)", "py")], token)
        assert r.exit_code == 0 and r.output == "one\n2\n"
        r = await executor.execute_code_blocks([CodeBlock("echo hi", "bash")], token)
        assert r.exit_code == 1 and "Python only" in r.output
        r = await executor.execute_code_blocks([CodeBlock("1/0", "python"), CodeBlock("print('never')", "python")],
                                               token)
        assert r.exit_code == 1 and "ZeroDivisionError" in r.output and "never" not in r.output
        # Cancellation interrupts the running block; the session's state survives.
        token = CancellationToken()
        task = asyncio.ensure_future(executor.execute_code_blocks([CodeBlock("a = 99\nwhile True: pass", "python")],
                                                                  token))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        token.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 2
        r = await executor.execute_code_blocks([CodeBlock("print(a)", "python")], CancellationToken())
        assert r.output == "1\n"
        await executor.restart()
        r = await executor.execute_code_blocks([CodeBlock("print(a)", "python")], CancellationToken())
        assert r.exit_code == 1 and "NameError" in r.output
    finally:
        await executor.stop()


# -- LangChain --------------------------------------------------------------------------------

from jailcell.integrations.langchain import JailcellTool  # noqa: E402


def test_langchain_tool_invoke_and_ainvoke():
    tool = JailcellTool(policy="standard")
    try:
        assert tool.invoke({"code": "x = 6 * 7\nprint(x)"}).strip() == "[stdout]\n42"
        call = {"type": "tool_call", "id": "c1", "name": "code_interpreter",
                "args": {"code": "import matplotlib.pyplot as plt\nplt.plot([1, x])\nplt.show()\nx + 1"}}
        message = tool.invoke(call)
        assert message.tool_call_id == "c1" and "43" in message.content and "[image 1: image/png" in message.content
        assert message.artifact["status"] == "ok" and message.artifact["images"][0]["mime_type"] == "image/png"
        message = asyncio.run(tool.ainvoke(dict(call, id="c2", args={"code": "1 / 0"})))
        assert message.artifact["status"] == "error" and "ZeroDivisionError" in message.content
        assert tool.args["code"]["type"] == "string"  # the schema a chat model is bound with
    finally:
        tool.close()


def test_langchain_ainvoke_cancelled_kills_the_run_and_keeps_the_state():
    from ..conftest import busiest_cpu_s

    tool = JailcellTool(policy="minimal", sandbox_options={"timeout": 60})

    async def main():
        await tool.ainvoke({"code": "a = 1"})
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(tool.ainvoke({"code": "a = 2\nwhile True: pass"}), 1.5)
        assert busiest_cpu_s(tool._session._shared.jail.pid) < 0.2
        assert (await tool.ainvoke({"code": "print(a)"})).strip() == "[stdout]\n1"

    try:
        asyncio.run(main())
    finally:
        tool.close()


def test_missing_framework_gives_a_clear_error():
    code = ("import sys; sys.modules['langchain_core'] = None\n"
            "try:\n    import jailcell.integrations.langchain\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("MissingExtra") and 'pip install "jailcell[adapters]"' in out


MISSING = r"""
import runpy, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if the extra were not installed
sys.argv = ["jailcell", *sys.argv[2:]]
runpy.run_module("jailcell", run_name="__main__")
"""


@pytest.mark.parametrize("blocked, args, extra", [
    ("uvicorn", ["serve", "--upstream", "http://127.0.0.1:9/v1", "--policy", "minimal"], "serve"),
    ("starlette", ["serve", "--upstream", "http://127.0.0.1:9/v1", "--policy", "minimal"], "serve"),
    ("mcp", ["mcp", "--policy", "minimal"], "mcp"),
    ("rich", ["bench", "--quick", "--only", "warm_print"], "bench"),
])
def test_every_missing_extra_is_one_clear_error(blocked, args, extra):
    """The same exception type (MissingExtra, a JailcellError and an ImportError) and the same
    message shape everywhere; the CLI prints it without a traceback and exits 2."""
    r = subprocess.run([sys.executable, "-c", MISSING, blocked, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f'pip install "jailcell[{extra}]"' in r.stderr and "Traceback" not in r.stderr, r.stderr
    code = ("import sys\nsys.modules['mcp'] = None\nfrom jailcell import MissingExtra, JailcellError\n"
            "from jailcell.integrations.mcp import build_server\n"
            "try:\n    build_server('minimal')\nexcept MissingExtra as e:\n"
            "    print(isinstance(e, ImportError), isinstance(e, JailcellError), e.extra)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "True True mcp"
