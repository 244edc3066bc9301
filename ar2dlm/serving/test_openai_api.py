"""The real `openai` client against a real server: answers equal the engine's own, streamed or not, alone or 16 at
a time; usage, finish_reason, stop strings and the per-request `ar2dlm` decoding field."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ar2dlm.engine import Engine, encode_prompt
from ar2dlm.serving.conftest import DEFAULTS, MODEL_NAME, serving

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_dlm):
    with serving(tiny_dlm) as (server, _):
        yield server


def _expected(tiny_dlm, ids, **overrides):
    dlm, tok = tiny_dlm
    return Engine(dlm, tok).generate(ids, DEFAULTS.replace(**overrides))


def test_chat_equals_the_engine_streamed_or_not(tiny_dlm, server, openai_client):
    tok = tiny_dlm[1]
    want = _expected(tiny_dlm, encode_prompt(tok, PROMPT, chat=True))
    client = openai_client(server)
    messages = [{"role": "user", "content": PROMPT}]

    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages)
    assert whole.choices[0].message.content == want.text and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == {"length": "length"}.get(want.stop_reason, "stop")
    assert whole.usage.completion_tokens == len(want.tokens) and whole.usage.prompt_tokens == want.prompt_len
    assert whole.usage.total_tokens == want.prompt_len + len(want.tokens)
    assert whole.ar2dlm["nfe"] == want.nfe and whole.ar2dlm["policy"] == DEFAULTS.label

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)
    extras = [(c.model_extra or {}).get("ar2dlm") or {} for c in chunks if c.choices]
    forwards = [x for x in extras if "forward" in x]
    assert sum(len(f["tokens"]) for f in forwards) == len(want.tokens)  # every token, with the forward it came in
    assert [f["forward"] for f in forwards] == sorted(f["forward"] for f in forwards)


def test_completion_equals_the_engine_streamed_or_not(tiny_dlm, server, openai_client):
    tok = tiny_dlm[1]
    want = _expected(tiny_dlm, tok(PROMPT)["input_ids"], max_new_tokens=6)
    client = openai_client(server)
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6)
    assert whole.choices[0].text == want.text and whole.usage.completion_tokens == len(want.tokens)
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want.text
    by_ids = client.completions.create(model=MODEL_NAME, prompt=tok(PROMPT)["input_ids"], max_tokens=6)
    assert by_ids.choices[0].text == want.text


def test_sixteen_concurrent_requests_answer_as_one_at_a_time(tiny_dlm, openai_client):
    """More requests than rows (8 rows, 16 requests): the later ones join the running batch mid-way."""
    tok = tiny_dlm[1]
    prompts = [f"{PROMPT} {i} " * (1 + i % 3) for i in range(16)]
    alone = [_expected(tiny_dlm, encode_prompt(tok, p, chat=True)).text for p in prompts]
    with serving(tiny_dlm, max_running=8) as (server, engine):
        client = openai_client(server)

        def ask(prompt):
            return client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": prompt}])

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, prompts))
        assert [a.choices[0].message.content for a in answers] == alone
        assert engine.forwards < sum(a.ar2dlm["nfe"] for a in answers)  # they did share forwards


def test_stop_strings_and_max_tokens(tiny_dlm, server, openai_client):
    client = openai_client(server)
    free = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8).choices[0].text
    assert len(free) > 2, free
    cut = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, stop=[free[1:3]])
    assert cut.choices[0].text == free[:1] and cut.choices[0].finish_reason == "stop"
    short = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"


def test_the_ar2dlm_field_picks_the_decoding(tiny_dlm, server, openai_client):
    client = openai_client(server)
    ar = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, extra_body={"ar2dlm": {
        "policy": "ar", "stop_token_ids": []}})
    assert ar.ar2dlm["policy"] == "ar" and ar.ar2dlm["nfe"] == 6 and ar.usage.completion_tokens == 6
    tok = tiny_dlm[1]
    want = _expected(tiny_dlm, tok(PROMPT)["input_ids"], max_new_tokens=6, tau=0.9)
    strict = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6,
                                       extra_body={"ar2dlm": {"tau": 0.9}})
    assert strict.choices[0].text == want.text and strict.ar2dlm["nfe"] == want.nfe


def test_sampling_is_seeded(server, openai_client):
    client = openai_client(server)

    def sample(seed):
        return client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=1.0,
                                         top_p=0.9, seed=seed).choices[0].text

    assert sample(3) == sample(3)


def test_models_health_and_metrics(server, openai_client):
    models = openai_client(server).models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["capacity"] == 4 + 64
    openai_client(server).completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("ar2dlm_requests_total", "ar2dlm_generated_tokens_total", "ar2dlm_forwards_total",
                 "ar2dlm_tokens_per_forward_bucket", "ar2dlm_queue_depth", "ar2dlm_running_rows",
                 "ar2dlm_time_to_first_token_seconds_bucket", "ar2dlm_request_latency_seconds_bucket"):
        assert name in text, name
    assert 'ar2dlm_requests_total{endpoint="/v1/completions",status="200"}' in text
