"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

from typing import Any

from shared.messages import RequestFailed


class ApiError(Exception):
    """An error the client sees, with the HTTP status it is sent with."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_failure(cls, failure: RequestFailed) -> ApiError:
        # A stage could send anything; only a real error status reaches the client.
        status = failure.status if 400 <= failure.status <= 599 else 500
        return cls(status, failure.message, type=failure.error_type, param=failure.param)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"The request body is larger than this server's limit of {limit} bytes.", code="request_too_large"
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def unauthorized() -> ApiError:
    return ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")


def overloaded(limit: int) -> ApiError:
    return ApiError(
        503,
        f"The server has {limit} requests in flight, its limit; retry shortly.",
        type="server_error",
        code="server_overloaded",
        headers={"Retry-After": "1"},
    )


def queue_full(queued: int, limit: int) -> ApiError:
    return ApiError(
        503,
        f"The pipeline has {queued} requests waiting, at or over its limit of {limit}; retry shortly.",
        type="server_error",
        code="queue_full",
        headers={"Retry-After": "2"},
    )


def shutting_down() -> ApiError:
    return ApiError(
        503,
        "The gateway is shutting down; retry on another replica.",
        type="server_error",
        code="service_unavailable",
        headers={"Retry-After": "1"},
    )


def timed_out(timeout_s: float) -> ApiError:
    return ApiError(504, f"The request did not finish within {timeout_s:g} s.", type="timeout_error", code="timeout")


def internal(message: str) -> ApiError:
    return ApiError(500, message, type="server_error", code="internal_error")
