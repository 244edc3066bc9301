"""The engine thread: a server opens its model and runs its engine loop on one OS thread."""

from __future__ import annotations

import threading

import httpx
import pytest

from ar2dlm.engine import Engine
from ar2dlm.serving.app import create_app
from ar2dlm.serving.conftest import DEFAULTS, MODEL_NAME
from ar2dlm.serving.server import ServerThread
from ar2dlm.serving.settings import ServeSettings
from ar2dlm.serving.worker import EngineThread


def test_call_runs_on_the_thread_and_hands_back_results_and_errors():
    thread = EngineThread()
    assert thread.call(threading.current_thread) is thread.thread
    assert thread.call(lambda: 6 * 7) == 42
    def fail():
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        thread.call(fail)
    ran = threading.Event()
    thread.run_last(ran.set)
    thread.thread.join(10)
    assert ran.is_set() and not thread.thread.is_alive()  # the thread ends after its last task


def test_a_server_decodes_on_the_thread_that_built_its_engine(tiny_dlm):
    dlm, tok = tiny_dlm
    thread = EngineThread()
    engine = thread.call(lambda: Engine(dlm, tok, max_running=2))
    stepped_on = set()
    step = engine.step
    engine.step = lambda: stepped_on.add(threading.current_thread()) or step()
    app = create_app(engine, ServeSettings(model_name=MODEL_NAME, defaults=DEFAULTS), thread)
    with ServerThread(app) as server:
        reply = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "a b", "max_tokens": 4},
                           timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    assert stepped_on == {thread.thread} and not thread.thread.is_alive()  # stopped with the server
