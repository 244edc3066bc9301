"""Fixtures of the server tests: a tiny block-4 dLM opened once per session, and a real uvicorn server on
127.0.0.1 and a free port around an engine over it."""

from __future__ import annotations

import contextlib
import threading

import pytest

from ar2dlm.engine import DecodeParams, Engine
from ar2dlm.serving.app import create_app
from ar2dlm.serving.server import ServerThread
from ar2dlm.serving.settings import ServeSettings

MODEL_NAME = "tiny-dlm"
# greedy, few tokens, a low threshold so the sharpened tiny dLM commits several tokens a forward: fast tests
DEFAULTS = DecodeParams(policy="threshold", tau=0.5, max_new_tokens=8)


@pytest.fixture(scope="session")
def tiny_dlm_folder(tmp_path_factory):
    """A tiny sharpened block-4 dLM saved as a folder."""
    from ar2dlm.testing import tiny_base, tiny_dlm_folders

    root = tmp_path_factory.mktemp("serving")
    return tiny_dlm_folders(root, tiny_base(root), blocks=(4,))["dlm4"]


@pytest.fixture(scope="session")
def tiny_dlm(tiny_dlm_folder):
    """(dLM, tokenizer) of the tiny dLM."""
    from ar2dlm.model.open import open_for_decoding

    dlm, tok, _ = open_for_decoding(str(tiny_dlm_folder))
    return dlm, tok


@contextlib.contextmanager
def serving(tiny_dlm, max_running: int = 4, **settings):
    """A server over a fresh engine; yields (ServerThread, engine)."""
    dlm, tok = tiny_dlm
    engine = Engine(dlm, tok, max_running=max_running)
    settings = {"model_name": MODEL_NAME, "defaults": DEFAULTS, **settings}
    with ServerThread(create_app(engine, ServeSettings(**settings))) as server:
        yield server, engine


class Gate:
    """Holds the engine's steps until opened: requests stay in flight for as long as a test needs. Opens at the
    latest when its `with` block ends (a failed test must not leave the worker stuck)."""

    def __init__(self, engine: Engine):
        self.open_event = threading.Event()
        step = engine.step

        def gated_step():
            self.open_event.wait()
            return step()

        engine.step = gated_step

    def open(self) -> None:
        self.open_event.set()

    def __enter__(self) -> "Gate":
        return self

    def __exit__(self, *exc) -> None:
        self.open()


@pytest.fixture
def openai_client():
    """A factory of OpenAI clients that never retry (a retry would hide the status under test)."""
    import openai

    def make(server, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    return make
