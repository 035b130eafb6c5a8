"""A stand-in OpenAI-compatible completions server on 127.0.0.1 (http.server in a thread), with fault modes.

Its completion is a function of (prompt, seed, max_tokens) alone, so a test knows every sample it should get.
``faults`` (set by tests, read per request): ``fail`` (the next N completion requests answer 500), ``drop`` (close
the connection without an answer), ``malformed`` (200 with a body that is not JSON), ``slow`` (sleep that many
seconds before answering, once per request while ``slow_left`` > 0), ``fail_after`` (every completion request after
that many answers 500), ``healthy`` (False: /health answers 503), ``models`` (names served, else 404 as OpenAI
words it), ``too_long`` (answer max_tokens + 3 tokens), ``text_only`` (no token_ids: text only), ``latency`` (seconds every
answer takes: a stand-in for generation time, for bench/server_sampling.py).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

EOS = 2


def completion(prompt: list[int], seed: int, max_tokens: int) -> tuple[list[int], str]:
    """The stand-in's sample: length and tokens from the seed and prompt; finished (EOS) when seed % 3 == 0."""
    n = 1 + seed % max_tokens
    ids = [4 + (seed // 7 + sum(prompt) + k * 5) % 40 for k in range(n)]
    if seed % 3 == 0:
        return ids, "stop"
    return ids + [4 + (seed + k) % 40 for k in range(max_tokens - n)], "length"


def judge_answer(prompt: str, f: dict[str, Any]) -> dict[str, Any]:
    """The stand-in judge prefers the longer output, with a bias toward the first one (logit 1 + length gap / 4).
    Fault modes: ``no_logprobs`` (text only), ``bad_answer`` (answers "maybe"), ``nan_logprob``."""
    import math
    import re

    out1, out2 = re.findall(r'"output": """(.*?)"""', prompt, flags=re.S)
    z = 1.0 + (len(out1) - len(out2)) / 4
    p_m = 1 / (1 + math.exp(-z))
    text = "m" if p_m >= 0.5 else "M"
    if f.get("bad_answer"):
        return {"choices": [{"text": "maybe", "logprobs": None, "finish_reason": "length"}]}
    logprobs = {"tokens": [text], "top_logprobs": [{"m": math.log(p_m), " M": math.log(1 - p_m), "x": -9.0}]}
    if f.get("nan_logprob"):
        logprobs["top_logprobs"][0]["m"] = "NaN"
    choice = {"text": text, "finish_reason": "length", "logprobs": None if f.get("no_logprobs") else logprobs}
    return {"choices": [choice]}


class StandIn:
    def __init__(self) -> None:
        self.faults: dict[str, Any] = {"healthy": True}
        self.requests: list[dict[str, Any]] = []
        self.answered = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200 if server.faults.get("healthy", True) else 503, b"")
                else:
                    self._send(404, b'{"detail": "Not Found"}')

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                f = server.faults
                with server.lock:
                    server.requests.append(body)
                    fault = None
                    for name in ("fail", "drop", "malformed"):
                        if f.get(name, 0) > 0:
                            f[name] -= 1
                            fault = name
                            break
                    if fault is None and "fail_after" in f and server.answered >= f["fail_after"]:
                        fault = "fail"
                    slow = f.get("slow", 0) if f.get("slow_left", 0) > 0 else 0
                    if slow:
                        f["slow_left"] -= 1
                if slow or f.get("latency"):
                    time.sleep(slow or f["latency"])
                if fault == "fail":
                    return self._send(500, b'{"error": {"message": "CUDA out of memory (stand-in)"}}')
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                if fault == "malformed":
                    return self._send(200, b"<html>gateway</html>")
                if isinstance(body["prompt"], str):  # the LLM judge's pairwise prompt
                    return self._send(200, json.dumps(judge_answer(body["prompt"], f)).encode())
                if "models" in f and body["model"] not in f["models"]:
                    msg = f"The model `{body['model']}` does not exist."
                    return self._send(404, json.dumps({"error": {"message": msg, "code": 404}}).encode())
                ids, finish = completion(body["prompt"], body["seed"], body["max_tokens"])
                if f.get("too_long"):
                    ids, finish = ids + [5] * (body["max_tokens"] + 3 - len(ids)), "length"
                choice: dict[str, Any] = {
                    "index": 0,
                    "text": " ".join(f"w{i - 4}" for i in ids),
                    "finish_reason": finish,
                }
                if not f.get("text_only"):
                    choice["token_ids"] = ids
                with server.lock:
                    server.answered += 1
                answer = {"choices": [choice], "usage": {"completion_tokens": len(ids)}}
                self._send(200, json.dumps(answer).encode())

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # a listen backlog for 32 clients at once (the default 5 resets connections)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
