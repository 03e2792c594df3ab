"""Bearer-token authentication for both transports, and the bind-address policy.

The token is compared with :func:`hmac.compare_digest` (constant time, so its
bytes cannot be guessed from response times) and never logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from pathlib import Path

import grpc

from dannucnet.errors import InputError

# Health checks answer without a token so load balancers and QuPath's
# "is the server up?" probe work; they reveal nothing about the data.
OPEN_GRPC_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The token from --token or --token-file (first line), stripped; at least 16 characters, none blank."""
    if token and token_file:
        raise InputError("give either --token or --token-file, not both")
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8-sig").strip().splitlines()
        except UnicodeDecodeError:
            raise InputError(f"--token-file {token_file} is not UTF-8 text: put the token on its first line, "
                             "as plain text") from None
        except OSError as exc:
            raise InputError(f"cannot read --token-file {token_file}: {exc.strerror}") from None
        token = text[0].strip() if text else ""
        if not token:
            raise InputError(f"--token-file {token_file} is empty: put the token on its first line")
    if token is not None:
        # Clients' header values are stripped before the constant-time compare (HTTP trims
        # them anyway), so the server's token is too: padding must not count towards its length.
        token = token.strip()
        if any(c.isspace() or not c.isprintable() for c in token):
            raise InputError("the token contains spaces or control characters: use e.g. `openssl rand -hex 32`")
    if token is not None and len(token) < 16:
        raise InputError("the token is shorter than 16 characters: use a long random one (e.g. `openssl rand -hex 32`)")
    return token


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind_policy(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to expose an unauthenticated server beyond this machine."""
    if not is_loopback(host) and token is None and not insecure:
        raise InputError(
            f"refusing to listen on {host} (reachable from other machines) without a token: "
            "pass --token-file FILE (or --token), or --insecure if the network is trusted"
        )


class TokenChecker:
    """Checks ``Authorization: Bearer <token>`` values; accepts all when no token is set."""

    def __init__(self, token: str | None) -> None:
        self._expected = token.encode("utf-8") if token is not None else None

    @property
    def enabled(self) -> bool:
        return self._expected is not None

    def problem(self, authorization: str | None) -> str | None:
        """None when authorised, else a message for the client (never containing the token)."""
        if self._expected is None:
            return None
        if not authorization:
            return "missing token: send the header 'Authorization: Bearer <token>'"
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value:
            return "malformed Authorization header: expected 'Bearer <token>'"
        if not hmac.compare_digest(value.strip().encode("utf-8"), self._expected):
            return "invalid token"
        return None


class GrpcAuthInterceptor(grpc.ServerInterceptor):
    """Aborts unauthenticated calls with UNAUTHENTICATED before any handler runs."""

    def __init__(self, checker: TokenChecker) -> None:
        self._checker = checker

    def intercept_service(self, continuation: Callable, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not self._checker.enabled or handler_call_details.method in OPEN_GRPC_METHODS:
            return handler
        auth = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                auth = value if isinstance(value, str) else value.decode("latin-1")
        problem = self._checker.problem(auth)
        if problem is None:
            return handler
        return _deny(handler, problem)


def _deny(handler, message: str):
    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
