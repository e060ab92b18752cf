"""The gateway's renderers: the conversation core's events turned into the wire format of each API
(Chat Completions, Responses, DashScope), streaming and not.  Used by ``gateway.py``."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from .._result import Result
from ._gateway_requests import GatewayError, _echo_tools, _new_id
from .tools import TOOL_NAME, ExecutedCall, ToolLoopResult, format_result

_STOP_REASONS = {"answer": "stop", "client_tool_calls": "tool_calls", "max_steps": "length"}


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    return ((f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n").encode()


def _client_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in message.get("tool_calls") or [] if c["function"]["name"] != TOOL_NAME]


def _call_summary(call: ExecutedCall, container: str | None) -> dict[str, Any]:
    r = call.result
    return {"id": call.id, "code": call.code, "container_id": container, "status": r.status, "stdout": r.stdout,
            "stderr": r.stderr, "result": r.result, "error": r.error, "images": len(r.outputs)}


def _stopped_text(out: ToolLoopResult, max_steps: int) -> str | None:
    if out.stopped == "max_steps":
        return (f"[jailcell: the step limit was reached ({max_steps} model calls) before the model answered; "
                "raise it with jailcell serve --max-steps]")
    return out.message.get("content") if out.stopped == "answer" else None


class _ChatRender:
    def __init__(self, model: str, max_steps: int) -> None:
        self.model, self.max_steps = model, max_steps
        self.id, self.created = _new_id("chatcmpl"), int(time.time())

    def completion(self, out: ToolLoopResult, model: str, container: str | None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": _stopped_text(out, self.max_steps)}
        if out.message.get("reasoning_content"):
            message["reasoning_content"] = out.message["reasoning_content"]
        if out.stopped == "client_tool_calls":
            message["tool_calls"] = _client_calls(out.message)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": _STOP_REASONS[out.stopped]}],
                "usage": out.usage,
                "jailcell": {"stopped": out.stopped, "container_id": container,
                             "calls": [_call_summary(c, container) for c in out.calls]}}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    def chunks(self, event: tuple) -> list[bytes]:
        kind = event[0]
        out: list[bytes] = []
        if kind == "delta":
            out.append(self._chunk({event[1]: event[2]}))
        elif kind == "call":
            out.append(self._chunk({}, jailcell={"type": "code_interpreter_call", "id": event[1], "code": event[2],
                                                 "status": "interpreting"}))
        elif kind == "result":
            out.append(self._chunk({}, jailcell={"type": "code_interpreter_call", **_call_summary(*event[1:]),
                                                 "output": format_result(event[1].result)}))
        elif kind == "done":
            result, self.model, container = event[1:]
            if result.stopped == "max_steps":
                out.append(self._chunk({"content": _stopped_text(result, self.max_steps)}))
            if result.stopped == "client_tool_calls":
                out.append(self._chunk({"tool_calls": [dict(c, index=i) for i, c in
                                                       enumerate(_client_calls(result.message))]}))
            out.append(self._chunk({}, _STOP_REASONS[result.stopped],
                                   jailcell={"stopped": result.stopped, "container_id": container}))
            out.append(_sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                             "model": self.model, "choices": [], "usage": result.usage}))
            out.append(b"data: [DONE]\n\n")
        return out

    def error(self, exc: GatewayError) -> list[bytes]:
        return [_sse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}),
                b"data: [DONE]\n\n"]


class _ResponsesRender:
    """Builds the Response object and, on the way, the streaming events that describe it."""

    def __init__(self, body: dict[str, Any], model: str, include_outputs: bool, max_steps: int,
                 store: Callable[[str, ToolLoopResult, Any], None]) -> None:
        self.include_outputs, self.max_steps, self.store = include_outputs, max_steps, store
        self.seq = 0
        self.text: dict[str, Any] | None = None  # the message item being written
        self.thought: dict[str, Any] | None = None  # the reasoning item being written
        self.thought_streamed = False  # this model turn's reasoning came as deltas
        self.calls: dict[str, dict[str, Any]] = {}
        self.response: dict[str, Any] = {
            "id": _new_id("resp"), "object": "response", "created_at": int(time.time()), "model": model,
            "status": "in_progress", "incomplete_details": None, "error": None,
            "instructions": body.get("instructions"), "metadata": body.get("metadata") or {}, "output": [],
            "parallel_tool_calls": True, "tool_choice": body.get("tool_choice", "auto"), "tools": _echo_tools(body),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "previous_response_id": body.get("previous_response_id"), "store": body.get("store", True), "usage": None,
        }

    def _event(self, kind: str, **data: Any) -> bytes:
        self.seq += 1
        return _sse({"type": kind, "sequence_number": self.seq - 1, **data}, kind)

    def _add(self, item: dict[str, Any]) -> tuple[int, bytes]:
        self.response["output"].append(item)
        index = len(self.response["output"]) - 1
        return index, self._event("response.output_item.added", output_index=index, item=dict(item))

    def _open_text(self) -> list[bytes]:
        item = {"type": "message", "id": _new_id("msg"), "role": "assistant", "status": "in_progress", "content": []}
        index, added = self._add(item)
        self.text = {"item": item, "index": index, "text": ""}
        return [added, self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                   content_index=0, part={"type": "output_text", "text": "", "annotations": []})]

    def _write(self, delta: str) -> list[bytes]:
        out = [] if self.text is not None else self._open_text()
        assert self.text is not None
        self.text["text"] += delta
        return out + [self._event("response.output_text.delta", item_id=self.text["item"]["id"],
                                  output_index=self.text["index"], content_index=0, delta=delta, logprobs=[])]

    def _close_text(self) -> list[bytes]:
        if self.text is None:
            return []
        item, index, text = self.text["item"], self.text["index"], self.text["text"]
        self.text = None
        part = {"type": "output_text", "text": text, "annotations": []}
        item.update(status="completed", content=[part])
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _think(self, delta: str) -> list[bytes]:
        """The model's reasoning (``reasoning_content`` upstream) as a reasoning item, as the hosted
        API streams an open-weight model's reasoning text."""
        out: list[bytes] = []
        if self.thought is None:
            item = {"type": "reasoning", "id": _new_id("rs"), "summary": [], "status": "in_progress"}
            index, added = self._add(item)
            self.thought = {"item": item, "index": index, "text": ""}
            out.append(added)
        self.thought["text"] += delta
        self.thought_streamed = True
        return out + [self._event("response.reasoning_text.delta", item_id=self.thought["item"]["id"],
                                  output_index=self.thought["index"], content_index=0, delta=delta)]

    def _close_thought(self) -> list[bytes]:
        if self.thought is None:
            return []
        item, index, text = self.thought["item"], self.thought["index"], self.thought["text"]
        self.thought = None
        item.update(status="completed", content=[{"type": "reasoning_text", "text": text}])
        return [self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text),
                self._event("response.output_item.done", output_index=index, item=item)]

    def events(self, event: tuple) -> list[bytes]:
        kind = event[0]
        out: list[bytes] = []
        if self.seq == 0:
            out.append(self._event("response.created", response=dict(self.response)))
            out.append(self._event("response.in_progress", response=dict(self.response)))
        if kind == "delta" and event[1] == "reasoning_content":
            return out + self._think(event[2])
        out += self._close_thought()
        if kind == "delta" and event[1] == "content":
            out += self._write(event[2])
        elif kind == "turn":
            if event[1].get("reasoning_content") and not self.thought_streamed:  # a turn that was not streamed
                out += self._think(str(event[1]["reasoning_content"])) + self._close_thought()
            self.thought_streamed = False
            if event[1].get("content") and self.text is None:  # upstream did not stream this turn
                out += self._write(event[1]["content"])
            out += self._close_text()
        elif kind == "call":
            item = {"type": "code_interpreter_call", "id": f"ci_{event[1]}", "code": "", "container_id": "",
                    "status": "in_progress", "outputs": None}
            index, added = self._add(item)
            self.calls[event[1]] = {"item": item, "index": index}
            ids = {"item_id": item["id"], "output_index": index}
            item["code"] = event[2]
            out += [added, self._event("response.code_interpreter_call.in_progress", **ids),
                    self._event("response.code_interpreter_call_code.delta", delta=event[2], **ids),
                    self._event("response.code_interpreter_call_code.done", code=event[2], **ids),
                    self._event("response.code_interpreter_call.interpreting", **ids)]
            item["status"] = "interpreting"
        elif kind == "result":
            call, container = event[1], event[2]
            slot = self.calls[call.id]
            item, r = slot["item"], call.result
            item.update(container_id=container, status="completed" if r.status == "ok" else "failed",
                        outputs=_ci_outputs(r) if self.include_outputs else None)
            for tool in self.response["tools"]:  # as the hosted API does: the tool names its container
                if tool["type"] == "code_interpreter":
                    tool["container"] = container
            ids = {"item_id": item["id"], "output_index": slot["index"]}
            out += [self._event("response.code_interpreter_call.completed", **ids),
                    self._event("response.output_item.done", output_index=slot["index"], item=item)]
        elif kind == "done":
            result, model, container = event[1:]
            for tc in _client_calls(result.message) if result.stopped == "client_tool_calls" else []:
                item = {"type": "function_call", "id": f"fc_{tc['id']}", "call_id": tc["id"],
                        "name": tc["function"]["name"], "arguments": tc["function"].get("arguments", ""),
                        "status": "completed"}
                index, added = self._add(item)
                out += [added, self._event("response.function_call_arguments.done", item_id=item["id"],
                                           output_index=index, arguments=item["arguments"]),
                        self._event("response.output_item.done", output_index=index, item=item)]
            if result.stopped == "max_steps":
                out += self._write(_stopped_text(result, self.max_steps) or "") + self._close_text()
            self.response.update(
                model=model, status="incomplete" if result.stopped == "max_steps" else "completed",
                # the step limit bounds the model turns: the Responses API's "max_messages"
                incomplete_details={"reason": "max_messages"} if result.stopped == "max_steps" else None,
                usage=_responses_usage(result.usage))
            self.store(self.response["id"], result, container)
            final = "response.incomplete" if result.stopped == "max_steps" else "response.completed"
            out.append(self._event(final, response=self.response))
        return out

    def error(self, exc: GatewayError) -> list[bytes]:
        self.response.update(status="failed", error={"code": exc.code or "server_error", "message": exc.message})
        return [self._event("error", code=exc.code, message=exc.message, param=exc.param),
                self._event("response.failed", response=self.response)]


def _responses_usage(u: dict[str, Any]) -> dict[str, Any]:
    """Chat-completions usage (summed over the loop) in the Responses API's shape."""
    return {"input_tokens": u.get("prompt_tokens", 0), "output_tokens": u.get("completion_tokens", 0),
            "total_tokens": u.get("total_tokens", 0),
            "input_tokens_details": {"cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                                     "cache_write_tokens": 0},
            "output_tokens_details": {
                "reasoning_tokens": (u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)}}


def _ci_outputs(r: Result) -> list[dict[str, Any]]:
    logs = r.stdout + r.stderr + ((r.error or {}).get("traceback") or "")
    if r.status != "ok" and not (r.error or {}).get("traceback"):
        logs += f"[{r.status}: {(r.error or {}).get('message', '')}]"
    return [{"type": "logs", "logs": logs}] + [
        {"type": "image", "url": f"data:{o['mime_type']};base64,{o['data']}"} for o in r.outputs]


class _DashScopeRender:
    """DashScope's native format: cumulative ``tool_info``; text cumulative unless ``incremental_output``."""

    _FIELDS = ("content", "reasoning_content")

    def __init__(self, request_id: str, fmt: str, incremental: bool) -> None:
        self.request_id, self.fmt, self.incremental = request_id, fmt, incremental
        self.text = dict.fromkeys(self._FIELDS, "")     # everything the model wrote
        self.pending = dict.fromkeys(self._FIELDS, "")  # ... since the last chunk
        self.streamed = False                           # the current turn arrived as deltas
        self.tool_info: list[dict[str, Any]] = []
        self.usage: dict[str, int] = {}
        self.finish = "null"
        self.client_calls: list[dict[str, Any]] = []
        self.container: str | None = None
        self.n = 0

    def _add(self, field: str, text: str) -> bool:
        self.text[field] += text
        self.pending[field] += text
        return bool(text)

    def update(self, event: tuple) -> bool:
        """Fold one event in; True when it is worth a chunk."""
        kind = event[0]
        if kind == "delta":
            self.streamed = True
            return self._add(event[1], event[2])
        if kind == "turn":
            streamed, self.streamed = self.streamed, False
            return not streamed and any([self._add(f, event[1].get(f) or "") for f in self._FIELDS])
        if kind == "call":
            self.tool_info.append({"code_interpreter": {"code": event[2]}, "type": "code_interpreter"})
            return True
        if kind == "result":
            self.container = event[2]
            return False
        if kind == "done":
            result, _, self.container = event[1:]
            self.usage, self.finish = result.usage, _STOP_REASONS[result.stopped]
            if result.stopped == "client_tool_calls":
                self.client_calls = _client_calls(result.message)
            if result.stopped == "max_steps":
                self._add("content", _stopped_text(result, 0) or "")
            return True
        return False

    def payload(self, chunk: bool = False) -> dict[str, Any]:
        src = self.pending if chunk and self.incremental else self.text
        output: dict[str, Any]
        if self.fmt == "text":
            output = {"text": src["content"], "finish_reason": self.finish}
        else:
            message: dict[str, Any] = {"role": "assistant", "content": src["content"]}
            if src["reasoning_content"]:
                message["reasoning_content"] = src["reasoning_content"]
            if self.client_calls:
                message["tool_calls"] = self.client_calls
            output = {"choices": [{"finish_reason": self.finish, "message": message}]}
        if self.tool_info:
            output["tool_info"] = list(self.tool_info)
        if self.container:
            output["container_id"] = self.container
        usage: dict[str, Any] = {"input_tokens": self.usage.get("prompt_tokens", 0),
                                 "output_tokens": self.usage.get("completion_tokens", 0),
                                 "total_tokens": self.usage.get("total_tokens", 0)}
        if self.tool_info:
            usage["plugins"] = {"code_interpreter": {"count": len(self.tool_info)}}
        return {"output": output, "usage": usage, "request_id": self.request_id}

    def _frame(self, event: str, status: int, data: dict[str, Any]) -> bytes:
        self.n += 1
        extra = f"status:{status}\n" if status != 200 else ""
        return f"id:{self.n}\nevent:{event}\n:HTTP_STATUS/{status}\n{extra}data:{json.dumps(data)}\n\n".encode()

    def sse(self, event: tuple) -> list[bytes]:
        if not self.update(event):
            return []
        data = self.payload(chunk=True)
        self.pending = dict.fromkeys(self._FIELDS, "")
        return [self._frame("result", 200, data)]

    def sse_error(self, exc: GatewayError) -> list[bytes]:
        return [self._frame("error", exc.status, {"request_id": self.request_id, "code": _dashscope_code(exc),
                                                  "message": exc.message})]


def _dashscope_code(exc: GatewayError) -> str:
    return {400: "InvalidParameter", 401: "InvalidApiKey", 404: "InvalidParameter", 413: "InvalidParameter",
            429: "Throttling"}.get(exc.status, "InternalError")
