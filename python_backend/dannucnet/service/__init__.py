"""The serving door: one proto contract (``proto/dannucnet/v1``), two transports.

``servicer`` holds the RPC logic once; ``grpc_server`` exposes it over gRPC and
``gateway`` over HTTP/JSON (for QuPath scripts), both built by ``server``.
``batcher`` shares one model per device across concurrent requests; ``auth``
and ``limits`` keep the server safe to expose. The generated code lives in
``_generated`` and is produced only by ``codegen``.
"""

from __future__ import annotations

API_VERSION = "v1"
