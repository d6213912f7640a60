"""Errors a pipeline raises for the caller; the servicer turns each into its gRPC status."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """A request the server answers with a non-OK status and this message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class Unimplemented(ServingError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelLoadError(Exception):
    """A model version that cannot be served; the reason is reported in GetModel and the log."""
