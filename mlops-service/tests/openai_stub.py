"""A local OpenAI-compatible server for tests: ``POST /v1/chat/completions`` with usage.

The model is the only stand-in: the official ``openai`` SDK talks to it over
HTTP as it would to the provider. Each reply reports ``usage`` as the
request asks: ``prompt_tokens`` is the number of characters of the messages'
contents, ``completion_tokens`` the request's ``max_tokens`` (default 5); the
reply waits ``delay_seconds`` first, so calls have a known least duration.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OpenAIStub:
    """Serves on 127.0.0.1 (a free port) in a thread until :meth:`close`."""

    def __init__(self, delay_seconds: float = 0.05) -> None:
        self.delay_seconds = delay_seconds
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                time.sleep(stub.delay_seconds)
                prompt = sum(len(m.get("content") or "") for m in body["messages"])
                completion = body.get("max_tokens") or 5
                reply = json.dumps({
                    "id": f"chatcmpl-{uuid.uuid4().hex}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "ok " * completion}}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
