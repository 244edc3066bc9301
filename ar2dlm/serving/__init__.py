"""`ar2dlm serve`: an OpenAI-compatible HTTP server over the decoding engine (continuous batching).

| module | what |
| --- | --- |
| `app.py` | the FastAPI app: routes, error handlers, lifespan (starts and stops the worker) |
| `worker.py` | the engine's one thread: admits, cancels, steps, hands outputs to the asyncio side |
| `generation.py` | one request: submit, wait with a deadline, whole answer or SSE stream, cancel on disconnect |
| `schemas.py` | OpenAI request bodies -> prompt ids and `DecodeParams`, every field checked (400s) |
| `responses.py` | OpenAI response bodies and stream chunks (with the extra `ar2dlm` statistics) |
| `body.py` | body size limit, UTF-8, JSON, typed fields |
| `errors.py` | the OpenAI error object |
| `guard.py` | API key (constant-time compare) and per-status request counts |
| `metrics.py` | Prometheus metrics in the app's own registry |
| `settings.py` | the server's knobs |
| `server.py` | uvicorn in the foreground or in a thread |
| `bench.py` | the load generator of `ar2dlm bench-serve`: closed-loop clients, percentiles, table, plot |
| `static/index.html` | the live decoding page |
"""
