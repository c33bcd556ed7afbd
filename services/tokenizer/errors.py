"""A request the tokenizer stage refuses: a 400 naming the offending parameter."""

from __future__ import annotations

from shared.messages import RequestFailed

BAD_REQUEST = "invalid_request_error"


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def failure(request_id: str, exc: InvalidRequest) -> RequestFailed:
    return RequestFailed(request_id=request_id, status=400, error_type=BAD_REQUEST, message=str(exc), param=exc.param)
