"""Every kind of bad request gets an OpenAI error object and a 4xx naming what is wrong, never a 500 or a hang;
with an API key, every route but /health and the page needs it."""

from __future__ import annotations

import json

import httpx
import pytest

from ar2dlm.serving.conftest import MODEL_NAME, serving

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
TEXT = {"model": MODEL_NAME, "prompt": "hi"}
LONG_PROMPT = "the quick brown fox " * 200  # far beyond the tiny model's 256 positions


@pytest.fixture(scope="module")
def server(tiny_dlm):
    with serving(tiny_dlm, max_body_bytes=4096) as (server, _):
        yield server


def _post(server, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers=headers or {}, timeout=30)


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/v1/chat/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"", 400, None, "empty"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "must be a JSON object"),
    ("/v1/chat/completions", b'{"messages": [], "temperature": NaN}', 400, None, "NaN"),
    ("/v1/chat/completions", "caf\u00e9".encode("latin-1"), 400, None, "not valid UTF-8"),
    ("/v1/completions", {**TEXT, "prompt": "x" * 5000}, 413, None, "--max-body-bytes"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "12"}, 400, "max_tokens", "must be an integer"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 1.5}, 400, "max_tokens", "must be an integer"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "stream", "must be a boolean"),
    ("/v1/chat/completions", {**CHAT, "temperature": True}, 400, "temperature", "must be a number"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "must be an array"),
    ("/v1/chat/completions", {**CHAT, "messages": ["hi"]}, 400, "messages[0]", "must be an object"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content", "must be a string or an array"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", "must be one of"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]", "text only"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, 400,
     "messages[0].content", "lone surrogate"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "is empty"),
    ("/v1/chat/completions", {"model": MODEL_NAME}, 400, "messages", "is required"),
    ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "n", "n must be 1"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, 400, "max_tokens", "at least 1"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10 ** 12}, 400, "max_tokens", "too large"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 10 ** 6}, 400, "max_completion_tokens",
     "too large"),
    ("/v1/chat/completions", {**CHAT, "temperature": 3}, 400, "temperature", "[0, 2]"),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/chat/completions", {**CHAT, "seed": -1}, 400, "seed", "seed"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", ""]}, 400, "stop", "non-empty"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed with stream"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages",
     "context length"),
    ("/v1/completions", {**TEXT, "prompt": LONG_PROMPT}, 400, "prompt", "context length"),
    ("/v1/completions", {**TEXT, "prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ("/v1/completions", {**TEXT, "prompt": [1, 10 ** 9]}, 400, "prompt", "token ids must be in"),
    ("/v1/completions", {**TEXT, "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {**TEXT, "prompt": {"text": "x"}}, 400, "prompt", "must be a string"),
    ("/v1/completions", {"model": MODEL_NAME}, 400, "prompt", "is required"),
    ("/v1/completions", {**TEXT, "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {**TEXT, "model": 7}, 400, "model", "must be a string"),
    ("/v1/completions", {**TEXT, "ar2dlm": {"policy": "fastest"}}, 400, "ar2dlm", "unknown decoding policy"),
    ("/v1/completions", {**TEXT, "ar2dlm": {"tau": 2}}, 400, "ar2dlm", "tau"),
    ("/v1/completions", {**TEXT, "ar2dlm": {"tau": "high"}}, 400, "ar2dlm", "is not a number"),
    ("/v1/completions", {**TEXT, "ar2dlm": {"speed": 9}}, 400, "ar2dlm", "unknown decode setting"),
    ("/v1/completions", {**TEXT, "ar2dlm": {"temperature": 1}}, 400, "ar2dlm.temperature", "'temperature' field"),
    ("/v1/completions", {**TEXT, "ar2dlm": "threshold"}, 400, "ar2dlm", "must be an object"),
    ("/v1/completions", {**TEXT, "ar2dlm": {"policy": "verify", "draft_len": 10 ** 9}}, 400, "ar2dlm.draft_len",
     "at most 64"),
    ("/v1/completions", {**TEXT, "ar2dlm": {"policy": "verify", "draft_len": 20, "draft_every_length": True}}, 400,
     "ar2dlm.draft_len", "at most 9 on this server with draft_every_length"),
    ("/v1/completions", {**TEXT, "ar2dlm": {"policy": "verify", "draft_len": "often"}}, 400, "ar2dlm",
     "is not an integer or auto"),
    ("/v1/completions", {**TEXT, "logprobs": 3}, 400, "logprobs", "not supported"),
    ("/v1/completions", {**TEXT, "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {**TEXT, "max_token": 5}, 400, "max_token", "unrecognized request argument"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format",
     "only response_format"),
])
def test_bad_requests_get_an_openai_error(server, path, body, status, param, words):
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_a_body_over_the_limit_is_refused_without_a_content_length(server):
    """A chunked upload declares no size: the server counts as it reads."""
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_unknown_routes_and_methods_are_openai_errors(server):
    missing = httpx.get(f"{server.url}/v1/engines")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = httpx.get(f"{server.url}/v1/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_a_good_request_still_runs_after_the_bad_ones(server):
    response = _post(server, "/v1/completions", {**TEXT, "max_tokens": 2})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


def test_api_key(tiny_dlm, openai_client):
    import openai

    with serving(tiny_dlm, api_key="s3cret") as (server, _):
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(f"{server.url}{path}").status_code == 401
            wrong = httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer s3cre"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert _post(server, "/v1/completions", TEXT).status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/").status_code == 200  # the page is static; its requests carry the key
        with pytest.raises(openai.AuthenticationError):
            openai_client(server, api_key="wrong").models.list()
        answer = openai_client(server, api_key="s3cret").completions.create(model=MODEL_NAME, prompt="hi",
                                                                            max_tokens=2)
        assert answer.usage.completion_tokens == 2
