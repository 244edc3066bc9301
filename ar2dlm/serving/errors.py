"""OpenAI-style errors: every refusal is `{"error": {"message", "type", "param", "code"}}` with its HTTP status.

Handlers raise `ApiError`; the app turns it (and Starlette's own 404/405, and anything unexpected, as a 500) into
that body, so a client library reads every failure the same way it reads OpenAI's.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

# HTTP status -> OpenAI's error `type` (OpenAI reports most client mistakes as invalid_request_error)
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 for a request the server cannot run as written."""
    return ApiError(400, message, param, code)
