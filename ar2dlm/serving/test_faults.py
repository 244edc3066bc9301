"""Load and faults: a full queue is a 429, a deadline a clean error with the row freed, a client that goes away
cancels its request, a failing forward fails its requests (500) but not the server."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from ar2dlm.serving.conftest import MODEL_NAME, Gate, serving

# `ar` with no stop token: one token a forward until max_tokens, so a long request really takes long
ENDLESS = {"ar2dlm": {"policy": "ar", "stop_token_ids": []}}


def _chat(max_tokens: int = 4, stream: bool = False, **extra) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "the quick"}], "max_tokens": max_tokens,
            "stream": stream, **extra}


def _wait_for(predicate, timeout_s: float = 20.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        time.sleep(0.02)


def _unfinished(server) -> int:
    return httpx.get(f"{server.url}/health").json()["unfinished"]


def _metric(server, line_start: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_full_queue_gets_429_with_retry_after(tiny_dlm):
    with serving(tiny_dlm, max_running=1, max_waiting=1) as (server, engine), Gate(engine) as gate:
        with ThreadPoolExecutor(2) as pool:
            accepted = [pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=_chat(), timeout=60)
                        for _ in range(2)]
            _wait_for(lambda: _unfinished(server) == 2)  # one running, one waiting: capacity reached
            refused = httpx.post(f"{server.url}/v1/chat/completions", json=_chat())
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            gate.open()
            assert [f.result().status_code for f in accepted] == [200, 200]
        assert httpx.post(f"{server.url}/v1/chat/completions", json=_chat()).status_code == 200


def test_a_deadline_cancels_the_request_with_a_clean_error(tiny_dlm, openai_client):
    # no forward runs until the deadlines have passed
    with serving(tiny_dlm, request_timeout_s=0.5) as (server, engine), Gate(engine) as gate:
        long = _chat(max_tokens=200, **ENDLESS)
        t0 = time.monotonic()
        late = httpx.post(f"{server.url}/v1/chat/completions", json=long, timeout=60)
        assert late.status_code == 408 and time.monotonic() - t0 < 10
        error = late.json()["error"]
        assert error["code"] == "deadline_exceeded" and "--request-timeout" in error["message"]
        with pytest.raises(openai.APIError, match="deadline"):  # a stream that began: an error event
            body = {**long, "stream": True}
            extra = {"ar2dlm": body.pop("ar2dlm")}
            for _ in openai_client(server).chat.completions.create(**body, extra_body=extra):
                pass
        gate.open()
        _wait_for(lambda: _unfinished(server) == 0 and engine.num_running == 0 and engine.num_waiting == 0)
        assert _metric(server, 'ar2dlm_cancelled_requests_total{reason="deadline"}') == 2
        assert _metric(server, "ar2dlm_generated_tokens_total") == 0  # aborted, never decoded to their end


def test_a_client_that_leaves_mid_stream_frees_its_row(tiny_dlm):
    with serving(tiny_dlm, max_running=1) as (server, engine):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions",
                          json=_chat(max_tokens=200, stream=True, **ENDLESS), timeout=60) as response:
            for line in response.iter_lines():  # read until the first tokens arrived, then hang up
                if line.startswith("data: ") and "forward" in json.loads(line[6:]).get("ar2dlm", {}):
                    break
        # 200 forwards of one token would take seconds; the cancellation frees the row at the next step
        _wait_for(lambda: engine.num_running == 0 and _unfinished(server) == 0, timeout_s=10)
        assert _metric(server, 'ar2dlm_cancelled_requests_total{reason="disconnect"}') == 1
        assert _metric(server, "ar2dlm_generated_tokens_total") == 0  # aborted, never decoded to its end
        after = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(), timeout=60)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] > 0


def test_a_client_that_leaves_a_whole_response_cancels_it(tiny_dlm):
    with serving(tiny_dlm, max_running=1) as (server, engine), Gate(engine) as gate:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up (and closes) while no forward runs
            httpx.post(f"{server.url}/v1/chat/completions", json=_chat(max_tokens=200, **ENDLESS), timeout=0.5)
        _wait_for(lambda: _metric(server, 'ar2dlm_cancelled_requests_total{reason="disconnect"}') == 1)
        gate.open()
        _wait_for(lambda: _unfinished(server) == 0 and engine.num_running == 0 and engine.num_waiting == 0)
        assert _metric(server, "ar2dlm_generated_tokens_total") == 0  # aborted, never decoded to its end
        assert httpx.post(f"{server.url}/v1/chat/completions", json=_chat(), timeout=60).status_code == 200


def test_a_failing_forward_fails_its_requests_not_the_server(tiny_dlm):
    with serving(tiny_dlm) as (server, engine):
        step, calls = engine.step, []

        def failing_once():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("simulated device error")
            return step()

        engine.step = failing_once
        failed = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(), timeout=60)
        assert failed.status_code == 500 and "simulated device error" in failed.json()["error"]["message"]
        assert httpx.post(f"{server.url}/v1/chat/completions", json=_chat(), timeout=60).status_code == 200
