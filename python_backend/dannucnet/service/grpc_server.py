"""gRPC transport: the generated servicer interface bound to :class:`SegmentationService`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service._generated.v1 import segmentation_pb2_grpc as pb_grpc
from dannucnet.service.auth import GrpcAuthInterceptor, TokenChecker
from dannucnet.service.calls import Call
from dannucnet.service.servicer import SegmentationService
from dannucnet.service.status import ServiceError

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Segmentation"].full_name


def call_from_context(context: grpc.ServicerContext) -> Call:
    remaining = context.time_remaining()
    deadline = time.monotonic() + remaining if remaining is not None else None
    call = Call(deadline=deadline, is_active=context.is_active)
    context.add_callback(call.cancel)
    return call


class GrpcSegmentationServicer(pb_grpc.SegmentationServicer):
    def __init__(self, service: SegmentationService) -> None:
        self.service = service

    def GetModelInfo(self, request, context):  # noqa: N802 - names from the proto
        return self.service.model_info(request)

    def ListModels(self, request, context):  # noqa: N802
        return self.service.list_models(request)

    def SegmentRegion(self, request, context):  # noqa: N802
        try:
            return self.service.segment_region(request, call_from_context(context)).to_proto()
        except ServiceError as exc:
            context.abort(exc.code, exc.message)

    def PlanRegion(self, request, context):  # noqa: N802
        try:
            return self.service.plan_region(request, call_from_context(context))
        except ServiceError as exc:
            context.abort(exc.code, exc.message)

    def SegmentSlide(self, request, context) -> Iterator[pb.SegmentSlideResponse]:  # noqa: N802
        try:
            yield from self.service.segment_slide(request, call_from_context(context))
        except ServiceError as exc:
            context.abort(exc.code, exc.message)


def build_grpc_server(
    service: SegmentationService,
    checker: TokenChecker,
    *,
    max_workers: int = 32,
) -> tuple[grpc.Server, health.HealthServicer]:
    """A gRPC server with the Segmentation, Health and reflection services (ports not yet added)."""
    limit = service.limits.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dannucnet-grpc"),
        interceptors=[GrpcAuthInterceptor(checker)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, 256 * 1024 * 1024)),
            ("grpc.so_reuseport", 0),
        ],
        # Beyond this, gRPC itself answers RESOURCE_EXHAUSTED without queueing.
        maximum_concurrent_rpcs=max_workers + service.limits.max_pending,
    )
    pb_grpc.add_SegmentationServicer_to_server(GrpcSegmentationServicer(service), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return server, health_servicer
