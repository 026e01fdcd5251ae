"""The KServe v2 GRPCInferenceService (plus Triton's ModelConfig and ModelStatistics), on grpc.aio.

Every method is registered through `_answering`, the one place where an error becomes a gRPC status: a
ServingError with its own code and message, anything else INTERNAL (logged, its text kept from the client).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import json_format

from edgeloop_runtime.errors import ServingError
from edgeloop_runtime.limits import Limits
from edgeloop_runtime.protocol import grpc_codec
from edgeloop_runtime.protocol import grpc_predict_v2_pb2 as pb
from edgeloop_runtime.serving import Serving

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"


class InferenceService:
    """The service's methods, by their gRPC names; each takes (request, context) and returns the response."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.serving.ready)

    async def ModelReady(self, request, context):
        self.serving.find(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.serving.ready)

    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(self.serving.server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request, context):
        self.serving.find(request.name, request.version)
        document = self.serving.model_metadata()
        del document["parameters"]  # the gRPC message has no such field; ModelConfig carries them
        return json_format.ParseDict(document, pb.ModelMetadataResponse())

    async def ModelConfig(self, request, context):
        self.serving.find(request.name, request.version)
        return json_format.ParseDict({"config": self.serving.model_config()}, pb.ModelConfigResponse())

    async def ModelStatistics(self, request, context):
        if request.name:
            self.serving.find(request.name, request.version)
        return json_format.ParseDict(self.serving.model_stats(), pb.ModelStatisticsResponse())

    async def ModelInfer(self, request, context):
        serving = self.serving
        started = time.perf_counter()
        serving.inflight += 1
        outcome, queued_ns, held = "error", 0, 0

        def reserve(size: int) -> None:
            nonlocal held
            serving.budget.reserve(size)
            held += size

        try:
            serving.find(request.model_name, request.model_version)
            reserve(request.ByteSize())
            wanted = [output.name for output in request.outputs]
            results, queued_ns = await serving.submit(
                grpc_codec.decode_inputs(request, serving.signature, reserve), wanted
            )
            response = grpc_codec.encode_response(
                serving.model.name, serving.model.version, request.id, serving.model.outputs, results, wanted
            )
            outcome = "success"
            return response
        except ServingError as error:
            outcome = error.outcome
            raise
        finally:
            serving.inflight -= 1
            serving.budget.release(held)
            serving.metrics.request_done("grpc", outcome, time.perf_counter() - started, queued_ns)


def _answering(method: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """The method, with its errors turned into gRPC statuses."""

    async def call(request, context: grpc.aio.ServicerContext):
        try:
            return await method(request, context)
        except ServingError as error:
            await context.abort(getattr(grpc.StatusCode, error.grpc_code), str(error))
        except Exception:
            log.exception("unhandled error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")

    return call


def build_server(serving: Serving) -> grpc.aio.Server:
    limits: Limits = serving.limits
    options = [
        ("grpc.max_receive_message_length", limits.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", limits.max_grpc_streams),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.server_handshake_timeout_ms", int(limits.header_timeout * 1000)),
        ("grpc.max_connection_idle_ms", int(limits.idle_timeout * 1000)),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=limits.max_grpc_calls)
    service = InferenceService(serving)
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _answering(getattr(service, method.name)),
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    return server
