"""Who may call a moemesh gRPC server: mutual TLS credentials and the access policy.

With TLS on, every server asks for a client certificate signed by the mesh's CA and every channel presents
this process's certificate. Mesh services (workers, and the gateway's Registry) further require the caller's
certificate to be a *mesh* certificate (common name MESH_PEER_NAME); the gateway's public service accepts any
certificate of the CA (clients get theirs from `moemesh make-certs`, common name CLIENT_NAME) plus, when API
keys are configured, `authorization: Bearer KEY` metadata. Health is open to any verified caller.

Peers reach each other by IP or pod name, so channels verify the server's certificate against the fixed name
MESH_TLS_NAME (every mesh certificate carries it as a DNS name) rather than the address they dial.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from moemesh.config.security import SecurityConfig, TlsFiles

log = logging.getLogger(__name__)

MESH_TLS_NAME = "moemesh"  # the DNS name in every mesh certificate; channels verify it
MESH_PEER_NAME = "moemesh-mesh"  # the common name of the services' certificate
CLIENT_NAME = "moemesh-client"  # the common name of a client certificate
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")  # fmt: skip
BAD_KEY = "missing or invalid API key: send gRPC metadata 'authorization: Bearer <key>'"


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )


def mesh_channel_options(tls: TlsFiles | None) -> list[tuple[str, Any]]:
    return [("grpc.ssl_target_name_override", MESH_TLS_NAME)] if tls is not None else []


class ApiKeys:
    """A set of API keys, kept as sha256 digests and compared in constant time; never logged."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._digests)} keys>)"

    def check(self, authorization: str | None) -> bool:
        """True for `Bearer <key>` with a known key (or when no key is configured)."""
        if not self._digests:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        digest = hashlib.sha256(key.strip().encode()).digest()
        return any(hmac.compare_digest(digest, known) for known in self._digests)


@dataclass(frozen=True)
class AccessPolicy:
    """public_services: reachable by any verified caller (plus an API key when api_keys is set); every other
    service (except health/reflection) only by mesh peers when TLS is on."""

    tls: bool
    api_keys: ApiKeys
    public_services: tuple[str, ...] = ()


class AccessInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        service = details.method.strip("/").split("/")[0]
        if service in OPEN_SERVICES:
            return handler
        if service in self.policy.public_services:
            metadata = dict(details.invocation_metadata or ())
            if not self.policy.api_keys.check(metadata.get("authorization")):
                log.info("refused %s: %s", details.method, "bad or missing API key")
                return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, BAD_KEY)
            return handler
        if self.policy.tls:
            return _peers_only(handler, details.method)
        return handler


def peer_common_name(context: Any) -> str:
    names = context.auth_context().get("x509_common_name") or [b""]
    return names[0].decode(errors="replace")


def _peers_only(handler: Any, method: str) -> Any:
    async def check(context: Any) -> None:
        name = peer_common_name(context)
        if name != MESH_PEER_NAME:
            log.warning("refused %s from certificate %r: not a mesh peer", method, name)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} is for mesh peers only")

    return _wrap(handler, check)


def _refusing(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    async def check(context: Any) -> None:
        await context.abort(code, message)

    return _wrap(handler, check)


def _wrap(handler: Any, check: Any) -> Any:
    """The same handler with `await check(context)` before its behaviour (streaming or not)."""
    kind = (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )
    behaviour = getattr(handler, kind)

    if handler.response_streaming:

        async def streaming(request: Any, context: Any) -> Any:
            await check(context)
            result = behaviour(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result

        return handler._replace(**{kind: streaming})

    async def unary(request: Any, context: Any) -> Any:
        await check(context)
        return await behaviour(request, context)

    return handler._replace(**{kind: unary})


@dataclass(frozen=True)
class MeshSecurity:
    """One process's security, loaded once from its SecurityConfig."""

    tls: TlsFiles | None
    api_keys: ApiKeys

    @classmethod
    def from_config(cls, config: SecurityConfig) -> MeshSecurity:
        return cls(tls=config.tls_files(), api_keys=ApiKeys(config.api_keys()))

    def access(self, public_services: tuple[str, ...] = ()) -> AccessPolicy | None:
        """The policy for a server whose `public_services` face clients; None when security is off."""
        if self.tls is None and not self.api_keys:
            return None
        return AccessPolicy(tls=self.tls is not None, api_keys=self.api_keys, public_services=public_services)
