"""sampler: server against a stand-in OpenAI-compatible server on 127.0.0.1 (tests/trainer/standin_server.py):
seeded requests, the samples it answers, faults retried or reported as one line, and resume keeping finished rows."""

from __future__ import annotations

import json
import time

import pytest

from apo_trainer.errors import TrainError
from apo_trainer.server import CompletionClient, ServerError
from tests.trainer.conftest import tiny_config
from tests.trainer.standin_server import EOS, StandIn, completion


def _run(tiny, out, url, **kw):
    from apo_trainer.loop import run

    values = dict(rounds=1, final_eval=False, sampler="server", server_url=url, server_retries=3)
    values.update(kw)
    return run(tiny_config(tiny, out, **values), quiet=True)


def _samples(out):
    return [json.loads(x) for x in (out / "round-0" / "samples.jsonl").read_text().splitlines()]


@pytest.fixture
def server():
    with StandIn() as s:
        yield s


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr("apo_trainer.server.time.sleep", lambda s: None)


@pytest.fixture(scope="module")
def clean(tiny, tmp_path_factory):
    """A run against a healthy stand-in: its samples.jsonl is the bytes every fault test must reproduce."""
    with StandIn() as s:
        out = tmp_path_factory.mktemp("clean") / "out"
        _run(tiny, out, s.url)
        return out, list(s.requests)


def test_each_sample_is_one_seeded_request_and_the_answer_is_what_is_kept(tiny, clean):
    out, requests = clean
    rows = _samples(out)
    assert len(requests) == 6 * 4 and all(r["n"] == 1 and r["max_tokens"] == 6 for r in requests)
    assert {r["model"] for r in requests} == {str(tiny / "policy")}
    sent = {(tuple(r["prompt"]), r["seed"]) for r in requests}
    for row in rows:
        for seed, ids in zip(row["seeds"], row["response_ids"], strict=True):
            assert (tuple(row["prompt_ids"]), seed % 2**31) in sent
            want, finish = completion(row["prompt_ids"], seed % 2**31, 6)
            assert ids == (want + [EOS] if finish == "stop" else want)
    assert any(f for r in rows for f in r["finished"]) and not all(f for r in rows for f in r["finished"])
    assert not list(out.glob(".server-rows-*"))  # the partial rows are removed once samples.jsonl is written


@pytest.mark.parametrize(
    "faults",
    [
        {"fail": 3},  # HTTP 500, retried
        {"drop": 2},  # connection closed without an answer
        {"malformed": 2},  # 200 with a body that is not JSON
        {"slow": 1.5, "slow_left": 1},  # past server_timeout, retried
        {"text_only": True},  # no token_ids: the text is tokenized
    ],
    ids=lambda f: next(iter(f)),
)
def test_faults_that_pass_are_retried_and_give_the_same_bytes(tiny, tmp_path, server, clean, faults):
    server.faults.update(faults)
    out = tmp_path / "out"
    _run(tiny, out, server.url, server_timeout=0.5, server_concurrency=4)
    assert (out / "round-0" / "samples.jsonl").read_bytes() == (clean[0] / "round-0" / "samples.jsonl").read_bytes()


def test_a_server_that_keeps_failing_is_one_line_and_a_rerun_keeps_the_finished_rows(tiny, tmp_path, server, clean):
    server.faults["fail_after"] = 10
    out = tmp_path / "out"
    with pytest.raises(TrainError) as e:
        _run(tiny, out, server.url, server_retries=2, server_concurrency=1)
    msg = str(e.value)
    assert "\n" not in msg and server.url in msg and "failed 3 times" in msg and "CUDA out of memory" in msg
    assert not (out / "round-0" / "samples.jsonl").exists()
    assert len(server.requests) == 10 + 3  # 10 answered, then one request tried 3 times
    del server.faults["fail_after"]
    server.requests.clear()
    _run(tiny, out, server.url)
    assert len(server.requests) == 24 - 10  # only the rows not finished before
    assert (out / "round-0" / "samples.jsonl").read_bytes() == (clean[0] / "round-0" / "samples.jsonl").read_bytes()


def test_a_server_that_never_becomes_healthy_is_one_line(tiny, tmp_path, server):
    server.faults["healthy"] = False
    t0 = time.perf_counter()
    with pytest.raises(TrainError, match=r"health check \(GET /health\) failed 2 times, last: HTTP 503") as e:
        _run(tiny, tmp_path / "out", server.url, server_retries=1)
    assert "\n" not in str(e.value) and time.perf_counter() - t0 < 30 and server.requests == []


def test_a_url_that_does_not_answer_is_one_line(tiny, tmp_path):
    with StandIn() as s:
        url = s.url  # closed below: nothing listens there any more
    with pytest.raises(TrainError, match=r"failed 2 times, last: ConnectionRefusedError") as e:
        _run(tiny, tmp_path / "out", url, server_retries=1)
    assert url in str(e.value)


def test_an_unknown_model_is_refused_at_once_with_the_servers_words(tiny, tmp_path, server):
    server.faults["models"] = ["some-other-model"]
    with pytest.raises(
        TrainError, match=r"refused POST /v1/completions \(HTTP 404: The model `.*policy` does not exist"
    ):
        _run(tiny, tmp_path / "out", server.url, server_concurrency=1)
    assert len(server.requests) == 1  # a 4xx is not retried
    server.requests.clear()
    _run(tiny, tmp_path / "out2", server.url, server_model="some-other-model")
    assert {r["model"] for r in server.requests} == {"some-other-model"}


def test_a_completion_longer_than_max_new_tokens_is_refused(tiny, tmp_path, server):
    server.faults["too_long"] = True
    with pytest.raises(TrainError, match="returned a completion of 9 tokens for max_new_tokens=6"):
        _run(tiny, tmp_path / "out", server.url)


def test_sampler_server_needs_a_url(tiny, tmp_path):
    with pytest.raises(TrainError, match="sampler 'server' needs server_url"):
        _run(tiny, tmp_path / "out", "")


def test_base_url_and_error_messages():
    from apo_trainer.server import _message, base_url

    assert base_url("http://h:1/v1/") == base_url("http://h:1/") == "http://h:1"
    assert _message(b'{"error": {"message": "bad  key"}}') == "bad key"
    assert _message(b'{"detail": "Not Found"}') == "Not Found"
    assert _message(b"<html>oops</html>") == "<html>oops</html>"
    with pytest.raises(ServerError, match="refused"), StandIn() as s:
        s.faults["models"] = []
        CompletionClient(s.url, retries=0).complete({"model": "x", "prompt": [1], "seed": 0, "max_tokens": 2})


def test_map_raises_the_first_failure_and_keeps_the_results_that_finished():
    import threading

    started = threading.Event()  # item 3 fails once item 4 runs

    def fn(i):
        if i == 3:
            started.wait(5)
            raise ValueError("boom")
        if i == 4:
            started.set()
            time.sleep(0.2)  # still running when item 3 fails: its result is kept
        return i * 10

    got = {}
    for _ in range(5):  # the order threads finish in varies: the first failure wins every time
        got.clear()
        started.clear()
        with pytest.raises(ValueError, match="boom"):
            CompletionClient("http://127.0.0.1:9", concurrency=4).map(fn, range(40), got.__setitem__)
        assert got[4] == 40 and 3 not in got and len(got) < 40
