"""TLS from files, and bearer-token authentication as a server interceptor."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

import grpc
from onnxserve.server.api.interceptors import HEALTH_PREFIX, Continuation, replace_behavior
from onnxserve.server.config.settings import ServerSettings


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured; with a client CA, clients must present
    a certificate it signed (mTLS)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else b""
    return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without one of the configured tokens in `authorization: Bearer <token>`
    metadata with UNAUTHENTICATED; health checks stay open."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    def _refusal(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        token = _bearer(metadata)
        if token is None:
            return "missing credentials: send the metadata 'authorization: Bearer <token>'"
        # Compared with every token in constant time, so timing reveals nothing about them.
        if not any([hmac.compare_digest(token, t) for t in self._tokens]):
            return "invalid bearer token"
        return None

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        refusal = None if details.method.startswith(HEALTH_PREFIX) else self._refusal(details.invocation_metadata)
        if handler is None or refusal is None:
            return handler

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)

        return replace_behavior(handler, lambda kind, behavior: refuse)
