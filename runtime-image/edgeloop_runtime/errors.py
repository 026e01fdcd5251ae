"""Errors a request can end in, with the HTTP status and gRPC code each one maps to."""

from __future__ import annotations


class ServingError(Exception):
    http_status = 500
    grpc_code = "INTERNAL"
    outcome = "error"  # the `outcome` label of edgeloop_requests_total


class BadRequest(ServingError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    outcome = "bad_request"


class NotFound(ServingError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    outcome = "not_found"


class TooLarge(ServingError):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"
    outcome = "too_large"


class Unavailable(ServingError):
    """The queue is full or the server is draining: the client should retry, elsewhere or later."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    outcome = "unavailable"


class HeadTooLarge(ServingError):
    """The request line, the header bytes or the header count is over its limit."""

    http_status = 431
    grpc_code = "RESOURCE_EXHAUSTED"
    outcome = "too_large"


class RequestTimeout(ServingError):
    """The client did not send its request's head or body in time."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"
    outcome = "timeout"
