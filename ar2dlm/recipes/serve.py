"""`ar2dlm serve`: an OpenAI-compatible HTTP server over the engine (continuous batching), with a live decoding page.

Routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics (Prometheus), and the page at /.

The decoding options below are the server's defaults; a request picks its own with the extra body field `ar2dlm`
(`{"policy": "threshold", "tau": 0.7}`). Without --policy a gated drafter decodes with its lossless `verify`, any
other model with `threshold`. `--max-new-tokens` is the default `max_tokens`. Binds 127.0.0.1 unless --host says
otherwise; with --api-key (or $AR2DLM_API_KEY) every route but /health and the page needs `Bearer <key>`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ar2dlm.engine import DecodeParams
from ar2dlm.engine.params import add_decode_args, decode_params_from_args, for_model, policy_was_given
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.open import MODEL_SPEC_HELP
from ar2dlm.utils.cli_config import add_dataclass_args, dataclass_from_args

API_KEY_ENV = "AR2DLM_API_KEY"


@dataclass(kw_only=True)
class ServeConfig:
    model: str = field(metadata={"help": MODEL_SPEC_HELP})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0: every interface)"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(default=None, metadata={
        "help": f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} when set, else no key)"})
    model_name: str | None = field(default=None, metadata={
        "help": "the model's name in the API (default: the --model folder's name)"})
    max_running: int = field(default=16, metadata={"help": "requests decoded together (KV-cache rows)"})
    max_waiting: int = field(default=64, metadata={"help": "requests waiting for a row beyond those; then 429"})
    request_timeout: float = field(default=600.0, metadata={
        "help": "seconds from a request's arrival to its last token; then it is cancelled (408)"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "larger request bodies get 413"})
    decode: DecodeParams = field(default_factory=DecodeParams, metadata={"cli": False})
    policy_given: bool = field(default=False, metadata={"cli": False})

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise Ar2dlmError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_running < 1:
            raise Ar2dlmError(f"--max-running must be >= 1, got {self.max_running}")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        self.settings(self.decode)  # the server's own checks, before the model loads

    def settings(self, defaults: DecodeParams):
        from ar2dlm.serving.settings import ServeSettings

        return ServeSettings(model_name=self.model_name or _default_name(self.model), defaults=defaults,
                             api_key=self.api_key, max_waiting=self.max_waiting,
                             request_timeout_s=self.request_timeout, max_body_bytes=self.max_body_bytes)


def _default_name(spec: str) -> str:
    path = Path(spec).expanduser()
    if path.name == "model" and path.parent.name:  # runs/NAME/model -> NAME
        return path.parent.name
    return path.name or spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, ServeConfig)
    add_decode_args(parser, defaults={"policy": None})


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    given = policy_was_given(args)
    return dataclass_from_args(ServeConfig, args, decode=decode_params_from_args(args), policy_given=given)


def server_defaults(cfg: ServeConfig, dlm) -> DecodeParams:
    """The request defaults: a gated drafter decodes with its lossless verify unless --policy said otherwise."""
    return for_model(cfg.decode, dlm, cfg.policy_given)


def build_app(cfg: ServeConfig):
    from ar2dlm.engine import Engine
    from ar2dlm.model.open import open_for_decoding
    from ar2dlm.serving.app import create_app
    from ar2dlm.serving.worker import EngineThread

    thread = EngineThread()  # the model is opened on the thread that will decode with it (see EngineThread)
    dlm, tokenizer, _ = thread.call(lambda: open_for_decoding(cfg.model))
    engine = thread.call(lambda: Engine(dlm, tokenizer, max_running=cfg.max_running))
    return create_app(engine, cfg.settings(server_defaults(cfg, dlm)), thread)


def run(cfg: ServeConfig) -> int:
    from ar2dlm.serving.server import LOOPBACK, serve_forever

    if cfg.host not in LOOPBACK and cfg.api_key is None:
        print(f"ar2dlm: warning: serving on {cfg.host} without --api-key: anyone who reaches it can use it",
              file=sys.stderr)
    app = build_app(cfg)
    settings = app.state.settings
    print(f"ar2dlm: serving {settings.model_name!r} (default policy {settings.defaults.label}) on "
          f"http://{cfg.host}:{cfg.port}  (the live page is at /)", file=sys.stderr)
    serve_forever(app, cfg.host, cfg.port)
    return 0
