"""OpenAI-shaped errors: one exception type for every handler, one JSON body that every client parses."""

from __future__ import annotations

import msgspec
from aiohttp import web

MAX_MESSAGE_CHARS = 512  # never echo a huge body back inside an error message

# Statuses a retry cannot fix; the openai SDK reads `x-should-retry: false` and gives up at once.
_NO_RETRY = {400, 401, 403, 404, 405, 413, 422}


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


class APIError(Exception):
    """An error the client caused or must hear about, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = truncate(message)
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorBody(self.message, self.type, self.param, self.code))

    def response(self) -> web.Response:
        headers = {}
        if self.status in _NO_RETRY:
            headers["x-should-retry"] = "false"
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return web.Response(
            status=self.status,
            body=msgspec.json.encode(self.body()),
            content_type="application/json",
            headers=headers,
        )


def truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found_model(model: str) -> APIError:
    return APIError(404, f"The model `{truncate(model, 128)}` does not exist.", param="model", code="model_not_found")


def server_error(message: str = "The engine failed while processing this request.") -> APIError:
    return APIError(500, message, type="internal_server_error", code="internal_error")


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="service_unavailable")


def from_http_exception(exc: web.HTTPException) -> APIError:
    """aiohttp's own refusals (unknown route, wrong method, body too large) in the OpenAI shape."""
    status = exc.status
    if status == 413:
        return APIError(413, "Request body too large: " + (exc.text or ""), code="request_too_large")
    if status == 404:
        return APIError(404, "Not found.", code="not_found")
    if status == 405:
        return APIError(405, "Method not allowed.", code="method_not_allowed")
    return APIError(status, exc.reason or "HTTP error", code=None)
