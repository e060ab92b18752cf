"""A scripted fake OpenAI-compatible upstream for tests (no model weights exist here)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(message, n):
    return {"id": f"c{n}", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def code_call(call_id, code):
    return {"id": call_id, "type": "function", "function": {"name": "code_interpreter", "arguments": json.dumps({"code": code})}}


class FakeUpstream:
    """Replies with the scripted messages in order; records every request body."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                upstream.requests.append(body)
                step = upstream.script.pop(0)
                data = json.dumps(completion(step(body) if callable(step) else step, len(upstream.requests))).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


