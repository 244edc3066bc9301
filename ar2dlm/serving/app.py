"""The FastAPI app: OpenAI's routes over one engine, plus /health, /metrics and the live page at /.

    app = create_app(engine, ServeSettings(model_name="my-dlm"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

The engine runs in the worker thread the app starts and stops with its lifespan; handlers only parse, submit and
wait, so the event loop stays free for other clients while the engine decodes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ar2dlm.engine import Engine
from ar2dlm.serving.body import read_json_body
from ar2dlm.serving.errors import ApiError
from ar2dlm.serving.generation import ClientGone, Generation
from ar2dlm.serving.guard import Guard
from ar2dlm.serving.metrics import CONTENT_TYPE, ServerMetrics
from ar2dlm.serving.schemas import ModelFacts, parse_chat, parse_completion
from ar2dlm.serving.settings import ServeSettings
from ar2dlm.serving.worker import EngineThread, EngineWorker

log = logging.getLogger(__name__)


def create_app(engine: Engine, settings: ServeSettings, engine_thread: EngineThread | None = None) -> FastAPI:
    """The app around `engine`; `engine_thread`: the thread that built it, where its loop then runs (worker.py)."""
    metrics = ServerMetrics()
    worker = EngineWorker(engine, settings.max_waiting, metrics, engine_thread)
    model = ModelFacts(engine.tokenizer, engine.context, _vocab_size(engine))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="ar2dlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.settings = worker, metrics, settings
    _add_error_handlers(app)
    _add_routes(app, worker, settings, model, metrics)
    app.add_middleware(Guard, api_key=settings.api_key, metrics=metrics)
    return app


def _add_routes(app: FastAPI, worker: EngineWorker, settings: ServeSettings, model: ModelFacts, metrics) -> None:
    started = int(time.time())

    async def generate(request: Request, parse):
        arrived = time.monotonic()
        job = parse(await read_json_body(request, settings.max_body_bytes), settings, model)
        generation = Generation(job, worker, settings, metrics, arrived)
        try:
            return await generation.respond(request)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request": no one reads it, metrics count it

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, parse_chat)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": started,
                                            "owned_by": "ar2dlm", "max_model_len": model.context}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "unfinished": worker.unfinished, "capacity": worker.capacity}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("ar2dlm.serving").joinpath("static/index.html").read_text(encoding="utf-8")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):  # unknown route (404), wrong method (405)
        return ApiError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        log.exception("unexpected error")
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error").body(),
                            status_code=500)


def _vocab_size(engine: Engine) -> int:
    """Token ids a prompt may hold: those both the tokenizer and the model's embedding know."""
    model_vocab = getattr(engine.dlm.hf_config, "vocab_size", None) or len(engine.tokenizer)
    return min(len(engine.tokenizer), model_vocab)
