"""A client for an OpenAI-compatible ``/v1/completions`` server (vllm serve, SGLang, TGI), standard library only.

Used by ``sampler: server`` (one request per sample, seeded) and by the LLM judge. Requests run ``concurrency`` at
a time on threads; a request that fails in a way that may pass (connection refused or dropped, timeout, HTTP 5xx or
429, a body that is not the JSON expected) is retried ``retries`` times with exponential backoff; any other
refusal (HTTP 4xx: unknown model, bad parameter) stops at once. Every failure is one line naming the server, the
cause and the server's own message.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from apo_merge.errors import shorten
from apo_trainer.errors import TrainError


class ServerError(TrainError):
    """The server failed a request (after retries where retrying may help)."""


class _Retry(Exception):
    """A failure worth another try."""


class _Stopped(Exception):
    """A request not started because another one failed."""


def base_url(url: str) -> str:
    """``http://host:port`` from any of ``http://host:port``, ``.../``, ``.../v1``, ``.../v1/``."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _message(body: bytes) -> str:
    """The server's own error message from an error body (OpenAI: error.message; others: message, detail)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return shorten(" ".join(text.split()), 200) or "no message"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            for key in ("message", "detail", "error"):
                if isinstance(err.get(key), str):
                    return shorten(" ".join(err[key].split()), 200)
        elif isinstance(err, str):
            return shorten(" ".join(err.split()), 200)
    return shorten(" ".join(text.split()), 200)


class CompletionClient:
    """POSTs to ``URL/v1/completions``; see the module doc for retries. ``sleep`` is injectable for tests."""

    def __init__(
        self,
        url: str,
        *,
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 4,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = base_url(url)
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.sleep = sleep

    def _once(self, method: str, path: str, body: dict[str, Any] | None, parse: bool = True) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            msg = f"HTTP {e.code}: {_message(e.read())}"
            if e.code >= 500 or e.code == 429:
                raise _Retry(msg) from None
            raise ServerError(f"server {self.url} refused {method} {path} ({msg})") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, dropped, timed out
            reason = getattr(e, "reason", e)
            raise _Retry(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__) from None
        if not parse:
            return raw
        try:
            return json.loads(raw)
        except ValueError:
            raise _Retry(f"the answer is not JSON: {shorten(raw.decode('utf-8', 'replace'), 80)!r}") from None

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, check: Callable | None = None, what: str = ""
    ) -> Any:
        """One call with retries; ``check(answer)`` raises ``ValueError`` when the answer is malformed (retried).
        ``check=None`` takes any answer, not even JSON (a health check)."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                answer = self._once(method, path, body, parse=check is not None)
                return check(answer) if check else answer
            except _Retry as e:
                last = str(e)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                last = f"unexpected answer ({type(e).__name__}: {shorten(str(e), 120)})"
        raise ServerError(
            f"server {self.url}: {what or f'{method} {path}'} failed {self.retries + 1} times, last: {last}; check "
            "that it runs and answers (server_url, server_timeout, server_retries)"
        )

    def wait_healthy(self) -> None:
        """GET /health (vLLM, SGLang, TGI answer it once the model is loaded), retried like a request."""
        self.request("GET", "/health", what="the health check (GET /health)")

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One /v1/completions call; returns ``choices[0]`` (with ``usage`` when the server sends it)."""

        def check(answer: Any) -> dict[str, Any]:
            choice = answer["choices"][0]
            if not isinstance(choice.get("text", ""), str) and "token_ids" not in choice:
                raise ValueError("choices[0] has neither text nor token_ids")
            return {**choice, "usage": answer.get("usage") or {}}

        return self.request("POST", "/v1/completions", body, check)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], done: Callable[[Any, Any], None]) -> None:
        """``fn(item)`` for every item, ``concurrency`` at a time; ``done(item, result)`` in completion order. The
        first failure cancels what has not started, waits for what runs (keeping its results), and is raised."""
        lock, stop = threading.Lock(), threading.Event()
        first: list[BaseException] = []

        def fail(e: BaseException) -> None:
            with lock:
                if not first:
                    first.append(e)
            stop.set()

        def guarded(item: Any) -> Any:
            if stop.is_set():  # a request failed for good: start no more
                raise _Stopped
            try:
                return fn(item)
            except BaseException as e:
                fail(e)
                raise

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(guarded, item): item for item in items}
            for fut in _as_completed(futures):
                if fut.cancelled() or fut.exception() is not None:
                    continue  # recorded by guarded (or stopped)
                try:  # results that arrive after a failure are still kept (a rerun skips them)
                    done(futures[fut], fut.result())
                except BaseException as e:
                    fail(e)
                if stop.is_set():
                    for f in futures:
                        f.cancel()
        if first:
            raise first[0]


def _as_completed(futures: Iterable[Any]) -> Iterable[Any]:
    from concurrent.futures import as_completed

    return as_completed(list(futures))
