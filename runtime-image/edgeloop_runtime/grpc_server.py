"""The KServe v2 GRPCInferenceService (plus Triton's ModelConfig and ModelStatistics), on grpc.aio."""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf import json_format

from edgeloop_runtime.errors import ServingError
from edgeloop_runtime.protocol import grpc_codec
from edgeloop_runtime.protocol import grpc_predict_v2_pb2 as pb
from edgeloop_runtime.protocol import grpc_predict_v2_pb2_grpc as pb_grpc
from edgeloop_runtime.serving import Serving

log = logging.getLogger(__name__)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def _abort(self, context: grpc.aio.ServicerContext, error: ServingError) -> None:
        await context.abort(getattr(grpc.StatusCode, error.grpc_code), str(error))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.serving.ready)

    async def ModelReady(self, request, context):
        try:
            self.serving.find(request.name, request.version)
        except ServingError as error:
            await self._abort(context, error)
        return pb.ModelReadyResponse(ready=self.serving.ready)

    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(self.serving.server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request, context):
        try:
            self.serving.find(request.name, request.version)
        except ServingError as error:
            await self._abort(context, error)
        document = self.serving.model_metadata()
        del document["parameters"]  # the gRPC message has no such field; ModelConfig carries them
        return json_format.ParseDict(document, pb.ModelMetadataResponse())

    async def ModelConfig(self, request, context):
        try:
            self.serving.find(request.name, request.version)
        except ServingError as error:
            await self._abort(context, error)
        return json_format.ParseDict({"config": self.serving.model_config()}, pb.ModelConfigResponse())

    async def ModelStatistics(self, request, context):
        if request.name:
            try:
                self.serving.find(request.name, request.version)
            except ServingError as error:
                await self._abort(context, error)
        return json_format.ParseDict(self.serving.model_stats(), pb.ModelStatisticsResponse())

    async def ModelInfer(self, request, context):
        serving = self.serving
        started = time.perf_counter()
        serving.inflight += 1
        outcome, queued_ns = "error", 0
        try:
            serving.find(request.model_name, request.model_version)
            wanted = [output.name for output in request.outputs]
            results, queued_ns = await serving.submit(grpc_codec.decode_inputs(request), wanted)
            response = grpc_codec.encode_response(
                serving.model.name, serving.model.version, request.id, serving.model.outputs, results, wanted
            )
            outcome = "success"
            return response
        except ServingError as error:
            outcome = error.outcome
            await self._abort(context, error)
        finally:
            serving.inflight -= 1
            serving.metrics.request_done("grpc", outcome, time.perf_counter() - started, queued_ns)


def build_server(serving: Serving, max_message_bytes: int) -> grpc.aio.Server:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(serving), server)
    return server
