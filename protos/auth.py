"""Who may call a worker: the cluster secret on every gRPC call, and optional TLS.

`splitserve up` (the `Controller`) makes one random secret per run and hands it to every worker inside
its `WorkerSpec`, through Ray (never an environment variable or a command line). Each call the router
makes carries it as the metadata header `SECRET_HEADER`; a worker's server refuses a call without it,
or with another one, with UNAUTHENTICATED before any handler runs (`ClusterSecretInterceptor`).

The secret travels in clear text unless the channels use TLS: on a network others can listen to, set
the `security` section's certificate fields (`GrpcTls`), which make the workers' servers and the router's
channels speak TLS (the server's certificate is checked against the CA; the name checked is
`server_name` when the certificate does not name the workers' addresses).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

__all__ = [
    "SECRET_HEADER",
    "ClusterSecretInterceptor",
    "GrpcTls",
    "SecretCallCredentials",
    "add_port",
    "aio_channel",
    "channel",
]

#: gRPC metadata key carrying the cluster secret (lowercase, as gRPC requires).
SECRET_HEADER = "x-splitserve-cluster-secret"


@dataclass(frozen=True)
class GrpcTls:
    """PEM bytes for TLS on the workers' gRPC: the server's certificate chain and key, and the CA that
    signed it (what clients verify against). `server_name` overrides the name checked against the
    certificate (for certificates that do not list the workers' IP addresses)."""

    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)
    ca: bytes = field(repr=False)
    server_name: str | None = None


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call."""

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster secret")

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort, **kw)


class ClusterSecretInterceptor(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call whose `SECRET_HEADER` is not the cluster secret."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        self._expected = secret.encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        got = ""
        for key, value in handler_call_details.invocation_metadata or ():  # type: ignore[attr-defined]
            if key == SECRET_HEADER:
                got = value if isinstance(value, str) else value.decode(errors="replace")
        if handler is None or hmac.compare_digest(got.encode(), self._expected):
            return handler
        return _denied(handler)


class SecretCallCredentials(grpc.AuthMetadataPlugin):
    """Adds the cluster secret to every call of a channel (as call credentials, over TLS or not)."""

    def __init__(self, secret: str) -> None:
        self._md = ((SECRET_HEADER, secret),)

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        callback(self._md, None)


def add_port(server: Any, address: str, tls: GrpcTls | None) -> int:
    """Bind `server` (sync or aio) to `address`, with TLS when `tls` is given; returns the port (0: failed)."""
    if tls is None:
        return int(server.add_insecure_port(address))
    creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=None, require_client_auth=False)
    return int(server.add_secure_port(address, creds))


def _tls_credentials(secret: str | None, tls: GrpcTls) -> tuple[grpc.ChannelCredentials, list]:
    """TLS channel credentials (verifying against the CA) carrying the secret as call credentials."""
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca)
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    if secret is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(SecretCallCredentials(secret)))
    return creds, options


class _AddSecret(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Plaintext sync channels: the secret as metadata on every call."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def _details(self, d: Any) -> Any:
        md = list(d.metadata or ()) + [(SECRET_HEADER, self._secret)]
        return _Details(
            d.method, d.timeout, md, d.credentials, getattr(d, "wait_for_ready", None), getattr(d, "compression", None)
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


@dataclass(frozen=True)
class _Details(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def channel(
    address: str, secret: str | None, tls: GrpcTls | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A sync channel to a worker that presents `secret` on every call (TLS when `tls` is given)."""
    if tls is not None:
        creds, extra = _tls_credentials(secret, tls)
        return grpc.secure_channel(address, creds, options=[*options, *extra])
    ch = grpc.insecure_channel(address, options=list(options))
    return grpc.intercept_channel(ch, _AddSecret(secret)) if secret is not None else ch


class _AioSecret:
    """Plaintext aio channels: the secret as metadata on every call (grpc.aio files an interceptor under
    the first kind it is an instance of, so each kind has a class of its own)."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        md = grpc.aio.Metadata(*(tuple(d.metadata) if d.metadata else ()))
        md.add(SECRET_HEADER, self._secret)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)


class _AioUnaryUnary(_AioSecret, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioSecret, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioSecret, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioSecret, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def aio_channel(
    address: str, secret: str | None, tls: GrpcTls | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """An asyncio channel to a worker that presents `secret` on every call (TLS when `tls` is given)."""
    if tls is not None:
        creds, extra = _tls_credentials(secret, tls)
        return grpc.aio.secure_channel(address, creds, options=[*options, *extra])
    interceptors: list[Any] | None = None
    if secret is not None:
        interceptors = [k(secret) for k in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
