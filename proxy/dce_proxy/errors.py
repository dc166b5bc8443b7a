"""Every failure leaves as OpenAI-shaped JSON: {"error": {"message", "type", "code"}}."""

from __future__ import annotations

import json
import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

log = logging.getLogger("dce_proxy")

# Type and code for the HTTP errors Flask/Werkzeug raise on their own (the proxy raises ApiError):
# a request it cannot parse, an unknown route or method, a body over MAX_CONTENT_LENGTH.
_HTTP_ERRORS = {
    400: ("invalid_request_error", "bad_request"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
}


# FastAPI's answer to a route it does not have (vLLM serves embeddings only for an embedding model).
_NO_SUCH_ROUTE = b'{"detail":"Not Found"}'


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str, *,
                 param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "code": self.code}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}

    def response(self) -> Response:
        response = json_response(self.body(), self.status)
        if self.retry_after is not None:
            response.headers["Retry-After"] = str(self.retry_after)
        return response


def invalid(param: str, message: str) -> ApiError:
    return ApiError(422, message, "invalid_request_error", "invalid_value", param=param)


def bad_request(message: str, code: str = "invalid_json") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def unauthorized() -> ApiError:
    return ApiError(401, "Missing or invalid API key. Send it as 'Authorization: Bearer KEY', "
                    "'X-API-Key: KEY', Basic credentials or a '/k/KEY/' path prefix.",
                    "authentication_error", "invalid_api_key")


def too_many(message: str, code: str, retry_after: int) -> ApiError:
    return ApiError(429, message, "rate_limit_error", code, retry_after=max(1, retry_after))


def upstream_unavailable(message: str) -> ApiError:
    return ApiError(503, message, "upstream_unavailable", "upstream_unavailable", retry_after=5)


def upstream_timeout(message: str) -> ApiError:
    return ApiError(504, message, "upstream_timeout", "upstream_timeout")


def upstream_garbage(message: str) -> ApiError:
    return ApiError(502, message, "upstream_error", "bad_upstream_response")


def from_upstream(error: dict, status: int) -> ApiError:
    """vLLM's own error object as one of ours, for a stream that already started (no status left to pass)."""
    code = error.get("code")
    return ApiError(status, str(error.get("message") or "vLLM reported an error."),
                    str(error.get("type") or "upstream_error"),
                    code if isinstance(code, (str, int)) and not isinstance(code, bool) else "upstream_error")


def _vllm_error_object(body: bytes) -> dict | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed["error"] if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict) else None


def upstream_error(status: int, body: bytes) -> ApiError:
    """vLLM's error answer as an ApiError: its own when it is the JSON error we expect, else a 502;
    a 5xx without it is the vLLM router finding no replica that answers, a 503 to retry, and a 404
    without it a route vLLM does not serve for its model (embeddings for a chat model)."""
    error = _vllm_error_object(body)
    if error is None and status >= 500:
        return upstream_unavailable(f"No vLLM server answered (HTTP {status}); try again in a few seconds.")
    if status == 404 and body.strip() == _NO_SUCH_ROUTE:  # vLLM has no such route for its model
        return ApiError(404, "The served model does not support this route.", "invalid_request_error",
                        "unsupported_by_model")
    if error is None:
        return upstream_garbage(f"vLLM answered HTTP {status} without a JSON error.")
    return from_upstream(error, status)


def upstream_error_answer(status: int, body: bytes) -> Response:
    """vLLM's own error, passed through with its status and bytes when it is the JSON error we expect."""
    if _vllm_error_object(body) is None:
        raise upstream_error(status, body)
    return Response(body, status=status, mimetype="application/json")


def limits_store_unavailable() -> ApiError:
    return ApiError(503, "The limits store (Redis) is not reachable; try again shortly.",
                    "server_error", "limits_store_unavailable", retry_after=5)


def json_response(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def handle_api_error(error: ApiError):
        return error.response()

    @app.errorhandler(HTTPException)
    def handle_http_exception(error: HTTPException):
        status = error.code or 500
        type_, code = _HTTP_ERRORS.get(status, ("invalid_request_error", "http_error"))
        response = json_response({"error": {"message": error.description, "type": type_, "code": code}}, status)
        if getattr(error, "valid_methods", None):
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception):
        # The traceback goes to the server log, never to the client.
        log.exception("unhandled error: %s", type(error).__name__)
        return json_response({"error": {"message": "Internal proxy error.", "type": "server_error",
                                        "code": "internal_error"}}, 500)
