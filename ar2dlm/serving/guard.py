"""The outermost layer of the app (plain ASGI, so streams pass through untouched): the API key, and the count of
every response by endpoint and status."""

from __future__ import annotations

import hmac

from ar2dlm.serving.errors import ApiError

# routes anyone may call: a load balancer's health probe, and the static page (it holds no data; every request
# it makes carries the key typed into it)
OPEN_PATHS = ("/health", "/")
KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


class Guard:
    def __init__(self, app, api_key: str | None, metrics):
        self.app, self.metrics = app, metrics
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 0}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
                refusal = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await refusal.response()(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            endpoint = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            # 0: the client went away before a response began
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest takes as long for a wrong key as for a right one: no timing hints at the key
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
