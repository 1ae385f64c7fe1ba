"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every invalid request is a 400 (the engine's typed errors and pydantic's validation
alike: never a 422 or a 500 for bad input), an unknown model a 404, too many requests
in flight a 429, a dead or stopped engine a 503.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from streamgen.errors import (
    EngineDeadError,
    EngineNotStartedError,
    InvalidSamplingParamsError,
    InvalidStructuredOutputError,
    RequestError,
)


class APIError(Exception):
    """An error the API answers with ``status`` and the OpenAI error body."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(APIError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str, served: str) -> None:
        super().__init__(
            f"the model {model!r} does not exist here (this server serves {served!r})",
            param="model",
            code="model_not_found",
        )


class TooManyRequests(APIError):
    status = 429
    type = "rate_limit_error"


class Unavailable(APIError):
    status = 503
    type = "service_unavailable"


def from_exception(exc: BaseException) -> APIError:
    """The API error for an exception raised while handling a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        details = exc.errors()
        param = ".".join(str(p) for p in details[0]["loc"]) if details else None
        message = f"{param}: {details[0]['msg']}" if details and param else str(exc)
        return BadRequest(message, param=param)
    if isinstance(exc, EngineDeadError | EngineNotStartedError):
        return Unavailable(str(exc) or "the engine is not running")
    if isinstance(exc, InvalidStructuredOutputError):  # a schema, regex or grammar
        return BadRequest(str(exc), param="response_format")
    if isinstance(exc, InvalidSamplingParamsError):  # "<field> must be ...": name it
        return BadRequest(str(exc), param=str(exc).split(" ", 1)[0])
    if isinstance(exc, RequestError):
        return BadRequest(str(exc))
    return APIError(f"internal error: {type(exc).__name__}: {exc}")
