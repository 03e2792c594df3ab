"""The client names why a call ended: a deadline that arrives as CANCELLED is still a deadline.

Under load the server's copy of a deadline can reset the stream before the client's own
timer fires, and the client then sees CANCELLED with no details (CI saw it once). A real
gRPC server on loopback reproduces it: it ends the call as CANCELLED a few milliseconds
before the client's deadline.
"""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest

from dannucnet.client import DanNucNetClient, ServerError
from dannucnet.errors import CancelledError
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service.grpc_server import SERVICE_NAME


def _server(delay_s: float) -> tuple[grpc.Server, str]:
    def model_info(request, context):
        time.sleep(delay_s)
        context.abort(grpc.StatusCode.CANCELLED, "")

    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                model_info,
                request_deserializer=pb.GetModelInfoRequest.FromString,
                response_serializer=pb.ModelInfo.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("delay_s", "timeout_s", "expected"),
    [(0.98, 1.0, "deadline"), (0.0, 30.0, "cancelled")],
    ids=["cancelled-at-the-deadline", "cancelled-early"],
)
def test_cancelled_near_the_deadline_reads_as_a_deadline(delay_s, timeout_s, expected):
    server, address = _server(delay_s)
    try:
        with DanNucNetClient(address, retries=0) as client:
            with pytest.raises((ServerError, CancelledError)) as err:
                client.model_info(timeout=timeout_s)
    finally:
        server.stop(None)
    if expected == "deadline":  # the client's timer or the server's early CANCELLED: both a deadline
        assert isinstance(err.value, ServerError) and err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "DEADLINE_EXCEEDED" in str(err.value)
    else:  # a CANCELLED long before the deadline is a cancel
        assert isinstance(err.value, CancelledError)
