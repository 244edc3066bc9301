"""`ar2dlm serve` itself: its options' checks, its default policy, and the real command in a subprocess, killed
with SIGKILL and started again on the same port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import pytest

from ar2dlm.cli import main, parse


@pytest.mark.parametrize("extra, message", [
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--max-waiting", "-1"], "--max-waiting must be >= 0"),
    (["--max-running", "0"], "--max-running must be >= 1"),
    (["--request-timeout", "0"], "--request-timeout must be > 0"),
    (["--max-body-bytes", "10"], "--max-body-bytes must be >= 1024"),
    (["--api-key", " "], "--api-key is empty"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_bad_options_are_refused_before_the_model_loads(tmp_path, capsys, extra, message):
    assert main(["serve", "--model", str(tmp_path / "no-model"), *extra]) == 2
    assert message in capsys.readouterr().err


def _config(*argv):
    recipe, args = parse(["serve", *argv])
    return recipe, recipe.config_from_args(args)


def test_a_drafter_serves_verify_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("AR2DLM_API_KEY", raising=False)
    drafter, plain = (SimpleNamespace(config=SimpleNamespace(drafter=d)) for d in (True, False))
    recipe, cfg = _config("--model", "runs/r1/model", "--tau", "0.7")
    assert recipe.server_defaults(cfg, drafter).label == "verify:auto+lookup"  # the draft length for this machine
    assert recipe.server_defaults(cfg, plain).label == "threshold:0.7"
    feature = SimpleNamespace(config=SimpleNamespace(drafter=True), drafts_from_features=True)
    assert recipe.server_defaults(cfg, feature).label == "verify:auto+lookup+tree"  # its drafts as a tree
    recipe, cfg = _config("--model", "m", "--draft-len", "2")
    assert recipe.server_defaults(cfg, drafter).label == "verify:2+lookup"
    recipe, cfg = _config("--model", "m", "--policy", "entropy")
    assert recipe.server_defaults(cfg, drafter).policy == "entropy"
    assert _config("--model", "runs/r1/model")[1].settings(cfg.decode).model_name == "r1"
    assert cfg.api_key is None and cfg.host == "127.0.0.1"


def test_the_api_key_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("AR2DLM_API_KEY", "from-env")
    assert _config("--model", "m")[1].api_key == "from-env"
    assert _config("--model", "m", "--api-key", "flag")[1].api_key == "flag"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ar2dlm", "serve", "--model", str(folder), "--port", str(port),
                             "--max-new-tokens", "4", "--tau", "0.5"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "AR2DLM_API_KEY": ""})


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


def test_the_command_serves_survives_sigkill_and_restarts(tiny_dlm_folder):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    body = {"model": "dlm4", "messages": [{"role": "user", "content": "the quick"}]}
    answers = []
    for _ in range(2):  # start, answer, kill -9; then the same again on the same port
        process = _start(tiny_dlm_folder, port)
        try:
            _wait_healthy(url, process)
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            answers.append(response.json()["choices"][0]["message"]["content"])
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
            process.stderr.close()
    assert answers[0] == answers[1]


def test_a_request_for_another_policy_drops_the_drafters_verify_settings(monkeypatch):
    from ar2dlm.serving.schemas import decode_params

    monkeypatch.delenv("AR2DLM_API_KEY", raising=False)
    drafter = SimpleNamespace(config=SimpleNamespace(drafter=True))
    recipe, cfg = _config("--model", "m")
    defaults = recipe.server_defaults(cfg, drafter)
    assert defaults.label == "verify:auto+lookup"
    for policy in ("ar", "threshold"):
        params = decode_params({"ar2dlm": {"policy": policy}}, defaults, 8)
        assert params.policy == policy and not params.lookup_drafts and params.draft_len is None
    assert decode_params({"ar2dlm": {"draft_len": 2}}, defaults, 8).label == "verify:2+lookup"
    assert decode_params({}, defaults, 8).label == "verify:auto+lookup"
