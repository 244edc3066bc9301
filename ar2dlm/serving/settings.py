"""What a server is configured with, apart from its engine: the model's public name, defaults, limits, the key."""

from __future__ import annotations

from dataclasses import dataclass, field

from ar2dlm.engine import DecodeParams
from ar2dlm.errors import Ar2dlmError


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    model_name: str  # what /v1/models lists and requests must name
    defaults: DecodeParams = field(default_factory=DecodeParams)  # a request's decoding unless it says otherwise
    api_key: str | None = None  # every route but /health (and the static page) then needs `Bearer <key>`
    max_waiting: int = 64  # requests waiting for a cache row beyond the running ones; then 429
    request_timeout_s: float = 600.0  # from arrival to the last token; then the request is cancelled
    max_body_bytes: int = 1_000_000
    retry_after_s: int = 1  # what a 429 tells the client to wait

    def __post_init__(self):
        if not self.model_name:
            raise Ar2dlmError("the served model needs a name")
        if self.max_waiting < 0:
            raise Ar2dlmError(f"--max-waiting must be >= 0, got {self.max_waiting}")
        if not self.request_timeout_s > 0:
            raise Ar2dlmError(f"--request-timeout must be > 0 seconds, got {self.request_timeout_s}")
        if self.max_body_bytes < 1024:
            raise Ar2dlmError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise Ar2dlmError("--api-key is empty")
