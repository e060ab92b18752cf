"""A scripted fake OpenAI-compatible upstream for tests (no model weights exist here).

Each script step is an assistant message (or a function of the request body returning one).
With ``stream: true`` the message is sent as chat-completion chunks the way vLLM / OpenAI do:
text in small pieces, tool-call arguments split across chunks, usage in a last chunk.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def completion(message, n):
    return {"id": f"c{n}", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
            "usage": USAGE}


def chunks(message, n):
    def chunk(delta, finish=None):
        return {"id": f"c{n}", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    for field in ("reasoning_content", "content"):
        text = message.get(field) or ""
        for i in range(0, len(text), 4):
            yield chunk({field: text[i:i + 4]})
    for index, call in enumerate(message.get("tool_calls") or []):
        args = call["function"]["arguments"]
        half = len(args) // 2
        yield chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                     "function": {"name": call["function"]["name"], "arguments": args[:half]}}]})
        yield chunk({"tool_calls": [{"index": index, "function": {"arguments": args[half:]}}]})
    yield chunk({}, "tool_calls" if message.get("tool_calls") else "stop")
    yield {"id": f"c{n}", "object": "chat.completion.chunk", "created": 0, "model": "fake", "choices": [],
           "usage": USAGE}


def code_call(call_id, code):
    return {"id": call_id, "type": "function", "function": {"name": "code_interpreter", "arguments": json.dumps({"code": code})}}


def function_call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def last_tool_output(body):
    return [m for m in body["messages"] if m["role"] == "tool"][-1]["content"]


class Raw:
    """A script step that answers by itself: ``fn(handler, body)`` writes whatever it likes (a hostile
    or broken upstream)."""

    def __init__(self, fn):
        self.fn = fn


def raw_json(payload, status=200):
    """A step that answers ``payload`` as the whole JSON body, whatever the request asked for."""
    return Raw(lambda handler, body: handler.reply(status, "application/json", json.dumps(payload).encode()))


def raw_sse(lines, delay=0.0):
    """A step that streams ``lines`` (bytes, each sent as one chunk, ``delay`` seconds apart)."""
    def send(handler, body):
        import time
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for line in lines:
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                handler.wfile.flush()
                if delay:
                    time.sleep(delay)
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            upstream_gone = getattr(handler.server, "client_gone", None)
            if upstream_gone is not None:
                upstream_gone.append(True)
    return Raw(send)


class FakeUpstream:
    """Replies with the scripted messages in order; records every request body.

    A step may also be an ``(status, text)`` or ``(status, text, headers)`` tuple: the upstream fails
    with that HTTP status; or a ``Raw`` step, which writes its own answer.  ``GET /models`` lists ``models``.
    """

    def __init__(self, script, models=("fake-model",)):
        self.script, self.requests, self.models, self.headers = list(script), [], list(models), []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with upstream.lock:
                    upstream.requests.append(body)
                    upstream.headers.append(dict(self.headers))
                    n = len(upstream.requests)
                    step = upstream.script.pop(0) if upstream.script else (500, "script exhausted")
                if isinstance(step, Raw):
                    return step.fn(self, body)
                if isinstance(step, tuple):
                    return self.reply(step[0], "application/json", json.dumps({"error": {"message": step[1]}}).encode(),
                                      step[2] if len(step) > 2 else {})
                message = step(body) if callable(step) else step
                if not body.get("stream"):
                    return self.reply(200, "application/json", json.dumps(completion(message, n)).encode())
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for data in [*chunks(message, n), "[DONE]"]:
                    payload = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
                self.wfile.write(b"0\r\n\r\n")

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    data = {"object": "list", "data": [{"id": m, "object": "model", "created": 1, "owned_by": "fake"}
                                                       for m in upstream.models]}
                    return self.reply(200, "application/json", json.dumps(data).encode())
                return self.reply(404, "application/json", b'{"error": {"message": "not found"}}')

            def reply(self, status, ctype, data, headers=None):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.client_gone = []  # Raw streams that found the gateway gone mid-answer
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
