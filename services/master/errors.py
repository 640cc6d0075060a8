"""Errors the HTTP API answers with, in the OpenAI shape:
`{"error": {"message", "type", "param", "code"}}` with a matching HTTP status."""
from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def wrong_type(param: str, expected: str) -> APIError:
    return APIError(400, f"'{param}' must be {expected}", param=param, code="invalid_type")


def unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"'{param}': {what} is not supported by this server", param=param,
                    code="unsupported_parameter")


def cluster_unavailable(detail: str) -> APIError:
    return APIError(503, f"the device cluster failed during generation: {detail}",
                    type="server_error", code="cluster_unavailable")


def internal_error(detail: str) -> APIError:
    return APIError(500, f"internal error during generation: {detail}", type="server_error",
                    code="internal_error")
