"""The KServe v2 GRPCInferenceService (plus Triton's ModelStreamInfer, ModelConfig, ModelStatistics and system
shared memory), spoken over HTTP/2 (edgeloop_runtime.http2) on the server's own event loop, beside HTTP/1.1.

Why not grpcio's server: in grpcio (aio and sync alike) a call crosses threads several times (grpc-core's
poller, the event loop, eventfd wake-ups), which put a floor of about 330 µs under a unary call on the
2-core machine, more than the whole HTTP/1.1 path with inference (~290 µs under the same load); here a call
is parsed, answered and written in one event-loop turn, like an HTTP request. The limits are the same as
HTTP's (edgeloop_runtime.limits): connection cap, handshake and idle time, concurrent streams and calls,
message size and time, and the memory budget, which counts a message's bytes as they arrive.

Every error a call ends in becomes its gRPC status in one place (`GrpcConnection.fail`): a ServingError with
its own code and message, anything else INTERNAL (logged, its text kept from the client).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import deque
from collections.abc import Callable
from urllib.parse import quote

from google.protobuf import json_format

from edgeloop_runtime import http2
from edgeloop_runtime.errors import BadRequest, RequestTimeout, ServingError, TooLarge
from edgeloop_runtime.listener import Listener
from edgeloop_runtime.protocol import grpc_codec
from edgeloop_runtime.protocol import grpc_predict_v2_pb2 as pb
from edgeloop_runtime.serving import Serving
from edgeloop_runtime.shared_memory import Unsupported

log = logging.getLogger(__name__)

SERVICE = b"/inference.GRPCInferenceService/"
STREAM_INFER = SERVICE + b"ModelStreamInfer"
STATUS = {  # gRPC status codes by name
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10,
    "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
}  # fmt: skip
# Fixed header blocks: ":status: 200" (static index 8) and content-type (static name 31), "grpc-status: 0".
RESPONSE_HEADERS = b"\x88" + http2.literal(31, b"application/grpc")
OK_TRAILERS = http2.literal(b"grpc-status", b"0")
MESSAGE_SAFE = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"  # grpc-message: printable ASCII but %, as is


class Unimplemented(ServingError):
    grpc_code = "UNIMPLEMENTED"
    outcome = "bad_request"


def framed(message: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\0" + len(message).to_bytes(4, "big") + message


class Service:
    """The unary methods, by path: each parses its request and answers a message, or a future of one."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.calls = 0  # open calls on every connection (--max-grpc-calls)
        self.unary: dict[bytes, tuple[type, Callable]] = {
            SERVICE + name.encode(): (getattr(pb, f"{name}Request"), getattr(self, name))
            for name in (
                "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                "ModelConfig", "ModelStatistics", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
                "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
                "CudaSharedMemoryUnregister",
            )
        }  # fmt: skip

    def ServerLive(self, request):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request):
        return pb.ServerReadyResponse(ready=self.serving.ready)

    def ModelReady(self, request):
        self.serving.find(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.serving.ready)

    def ServerMetadata(self, request):
        return json_format.ParseDict(self.serving.server_metadata(), pb.ServerMetadataResponse())

    def ModelMetadata(self, request):
        self.serving.find(request.name, request.version)
        document = self.serving.model_metadata()
        del document["parameters"]  # the gRPC message has no such field; ModelConfig carries them
        return json_format.ParseDict(document, pb.ModelMetadataResponse())

    def ModelConfig(self, request):
        self.serving.find(request.name, request.version)
        return json_format.ParseDict({"config": self.serving.model_config()}, pb.ModelConfigResponse())

    def ModelStatistics(self, request):
        if request.name:
            self.serving.find(request.name, request.version)
        return json_format.ParseDict(self.serving.model_stats(), pb.ModelStatisticsResponse())

    def SystemSharedMemoryStatus(self, request):
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.serving.shared_memory.status(request.name):
            response.regions[region["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return response

    def SystemSharedMemoryRegister(self, request):
        self.serving.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryUnregister(self, request):
        self.serving.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    def CudaSharedMemoryStatus(self, request):
        if request.name:
            raise BadRequest(f"unable to find cuda shared memory region '{request.name}'")
        return pb.CudaSharedMemoryStatusResponse()

    def CudaSharedMemoryRegister(self, request):
        raise Unsupported("CUDA shared memory is not supported; use system shared memory")

    def CudaSharedMemoryUnregister(self, request):
        return pb.CudaSharedMemoryUnregisterResponse()

    def ModelInfer(self, request: pb.ModelInferRequest, call) -> asyncio.Future:
        """A future of the response; the call (a serving.Call, holding the message's bytes) is finished with the
        request's outcome."""
        serving = self.serving
        answer = asyncio.get_running_loop().create_future()
        try:
            serving.find(request.model_name, request.model_version)
            wanted = grpc_codec.requested_outputs(request, serving.shared_memory)
            inputs = grpc_codec.decode_inputs(request, serving.signature, call.reserve, serving.shared_memory)
            future = call.submit(inputs, list(wanted))
        except BaseException as error:
            call.finish(error.outcome if isinstance(error, ServingError) else "error")
            answer.set_exception(error)
            return answer

        def done(future: asyncio.Future) -> None:
            if answer.cancelled():  # the client went away
                call.finish("cancelled")
                return
            try:
                results = call.ran(future)
                response = grpc_codec.encode_response(
                    serving.model.name, serving.model.version, request.id, serving.model.outputs, results, wanted,
                    serving.shared_memory,
                )  # fmt: skip
            except BaseException as error:
                call.finish(error.outcome if isinstance(error, ServingError) else "error")
                answer.set_exception(error)
                return
            call.finish("success")
            answer.set_result(response)

        future.add_done_callback(done)
        return answer


class Call(http2.Stream):
    """One gRPC call: its request bytes as they arrive; for ModelStreamInfer, its answers in the requests' order."""

    __slots__ = ("answers", "buffer", "encoding", "held", "method", "replied", "since", "unacknowledged")

    def __init__(self, stream_id: int, send_window: int) -> None:
        super().__init__(stream_id, send_window)
        self.method = b""
        self.encoding = b"identity"
        self.buffer = bytearray()
        self.held = 0  # memory budget held by the bytes in `buffer`
        self.since = time.monotonic()  # when the message being received began
        self.replied = False  # the response's headers are sent
        self.answers: deque[asyncio.Future] = deque()
        self.unacknowledged = 0  # ModelStreamInfer: bytes not yet given back to the client's window


class GrpcConnection(http2.Http2Connection):
    stream_class = Call

    def __init__(self, service: Service, listener: Listener) -> None:
        limits = listener.limits
        super().__init__(limits.max_grpc_streams, limits.max_header_bytes)
        self.service = service
        self.serving = service.serving
        self.listener = listener
        self.limits = limits
        self.since = time.monotonic()  # when the connection was made, or last had no call

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        if not self.listener.admit(self):
            self.transport = transport
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.forget(self)
        super().connection_lost(exc)

    # calls

    def stream_opened(self, call: Call, headers: dict[bytes, bytes]) -> None:
        self.service.calls += 1
        self.listener.waiting.pop(self, None)
        call.method = headers.get(b":path", b"")
        call.encoding = headers.get(b"grpc-encoding", b"identity")
        try:
            if headers.get(b":method") != b"POST" or not headers.get(b"content-type", b"").startswith(
                b"application/grpc"
            ):
                raise BadRequest("gRPC calls are POSTs of content-type application/grpc")
            if call.method != STREAM_INFER and call.method not in self.service.unary:
                raise Unimplemented(f"unknown method {call.method.decode(errors='replace')}")
            if self.service.calls > self.limits.max_grpc_calls:
                raise TooLarge(f"more than {self.limits.max_grpc_calls} gRPC calls at once (--max-grpc-calls)")
        except ServingError as error:
            self.serving.metrics.refused("grpc", error.outcome)
            self.fail(call, error)

    def stream_data(self, call: Call, data: bytes, ended: bool) -> None:
        if data:
            if not call.buffer:
                call.since = time.monotonic()
            call.buffer += data
            try:
                self.serving.budget.reserve(len(data))
                call.held += len(data)
                self._messages(call)
            except ServingError as error:
                self.fail(call, error)
                return
            if call.method == STREAM_INFER and len(call.answers) >= self.limits.max_pipelined:
                call.unacknowledged += len(data)  # enough answers pending: the client waits
            elif not ended:
                self.credit(call.id, len(data))
        if ended and self.streams.get(call.id) is call:
            if call.method == STREAM_INFER:
                self._answer_in_order(call)
            else:
                self._unary(call)

    def drop(self, call: Call) -> None:
        if self.streams.get(call.id) is call:
            self.service.calls -= 1
            self.serving.budget.release(call.held)
            call.held = 0
            for answer in call.answers:
                answer.cancel()
        super().drop(call)
        if not self.streams:
            self.since = time.monotonic()
            if self.transport is not None:
                self.listener.waiting[self] = None

    def _messages(self, call: Call) -> None:
        """Takes the complete messages out of a stream's buffer (a unary call's one waits for the call's end)."""
        buffer = call.buffer
        while len(buffer) >= 5:
            size = int.from_bytes(buffer[1:5], "big")
            if size > self.limits.max_body_bytes:
                raise TooLarge(f"a message of {size} bytes exceeds {self.limits.max_body_bytes} (--max-body-bytes)")
            if len(buffer) < 5 + size or call.method != STREAM_INFER:
                return
            inference = self._inference(call, 5 + size)
            try:
                message = self._decompress(inference, bytes(buffer[5 : 5 + size]), buffer[0], call.encoding)
            except BaseException:
                inference.finish("bad_request")
                raise
            del buffer[: 5 + size]
            call.since = time.monotonic()
            self._stream_request(call, message, inference)

    def _inference(self, call: Call, size: int):
        """A serving.Call that takes over the memory held by the call's next `size` bytes (from the budget's point
        of view nothing changes hands: the bytes stay held, by the inference now)."""
        inference = self.serving.call("grpc")
        call.held -= size
        inference.held += size
        return inference

    def _decompress(self, holder, message: bytes, compressed: int, encoding: bytes) -> bytes:
        """The message, inflated when its flag says so; the inflated bytes are held by `holder` (a serving.Call or
        a Call) until it finishes."""
        if not compressed:
            return message
        wbits = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}.get(encoding)
        if wbits is None:
            raise Unimplemented(f"grpc-encoding {encoding.decode(errors='replace')} is not supported")
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(message, self.limits.max_body_bytes + 1)
        except zlib.error as error:
            raise BadRequest(f"cannot decompress the message: {error}") from None
        if len(data) > self.limits.max_body_bytes:
            raise TooLarge(f"the decompressed message exceeds {self.limits.max_body_bytes} bytes (--max-body-bytes)")
        self.serving.budget.reserve(len(data))
        holder.held += len(data)
        return data

    def _unary(self, call: Call) -> None:
        buffer = call.buffer
        inference = None  # ModelInfer's serving.Call, once it holds the message
        try:
            if len(buffer) < 5 or len(buffer) != 5 + int.from_bytes(buffer[1:5], "big"):
                raise BadRequest("a unary call needs exactly one whole message")
            request_class, method = self.service.unary[call.method]
            if method == self.service.ModelInfer:
                inference = self._inference(call, len(buffer))
            message = self._decompress(inference or call, bytes(buffer[5:]), buffer[0], call.encoding)
            try:
                request = request_class.FromString(message)
            except Exception:  # protobuf's DecodeError and its kin
                raise BadRequest(f"the message is not a valid {request_class.__name__}") from None
            call.buffer = bytearray()
            if inference is not None:
                answer, inference = method(request, inference), None  # ModelInfer finishes it
            else:
                answer = method(request)
        except BaseException as error:
            if inference is not None:
                inference.finish(error.outcome if isinstance(error, ServingError) else "error")
            self.fail(call, error)
            return
        if isinstance(answer, asyncio.Future):
            answer.add_done_callback(lambda future: self._unary_done(call, future))
        else:
            self.reply(call, answer)

    def _unary_done(self, call: Call, future: asyncio.Future) -> None:
        if self.streams.get(call.id) is not call:
            return  # reset by the client, or the connection is gone
        error = future.exception()
        if error is not None:
            self.fail(call, error)
        else:
            self.reply(call, future.result())
        self.flush_soon()

    # ModelStreamInfer: each request answered in order, an error answered for its request only

    def _stream_request(self, call: Call, message: bytes, inference) -> None:
        answer = asyncio.get_running_loop().create_future()
        try:
            request = pb.ModelInferRequest.FromString(message)
        except Exception:
            inference.finish("bad_request")
            answer.set_result(pb.ModelStreamInferResponse(error_message="the message is not a valid ModelInferRequest"))
        else:
            inferred = self.service.ModelInfer(request, inference)
            inferred.add_done_callback(lambda future: answer.done() or answer.set_result(streamed(future, request)))
        answer.add_done_callback(lambda _: self._answer_in_order(call))
        call.answers.append(answer)

    def _answer_in_order(self, call: Call) -> None:
        if self.streams.get(call.id) is not call:
            return
        while call.answers and call.answers[0].done():
            self._send(call, framed(call.answers.popleft().result().SerializeToString()))
        if call.unacknowledged and len(call.answers) < self.limits.max_pipelined:
            self.credit(call.id, call.unacknowledged)
            call.unacknowledged = 0
        if call.remote_ended and not call.answers:  # the client is done and every answer is out
            self._open_reply(call)
            self.finish(call, OK_TRAILERS)
        self.flush_soon()

    # answering

    def _open_reply(self, call: Call) -> None:
        if not call.replied:
            self.output.append(http2.frame(http2.HEADERS, http2.END_HEADERS, call.id, RESPONSE_HEADERS))
            call.replied = True

    def _send(self, call: Call, data: bytes) -> None:
        self._open_reply(call)
        self.send(call, data)

    def reply(self, call: Call, response) -> None:
        self._send(call, framed(response.SerializeToString()))
        self.finish(call, OK_TRAILERS)

    def fail(self, call: Call, error: BaseException) -> None:
        """Ends the call with the error's gRPC status (trailers only, unless answers were sent already)."""
        if not isinstance(error, ServingError):
            log.error("unhandled error in %s", call.method.decode(errors="replace"), exc_info=error)
            error = ServingError("internal server error")
        trailers = http2.literal(b"grpc-status", b"%d" % STATUS[error.grpc_code]) + http2.literal(
            b"grpc-message", quote(str(error)[:1024], safe=MESSAGE_SAFE).encode()
        )
        if not call.replied:
            call.replied = True
            trailers = RESPONSE_HEADERS + trailers
        call.outbox.clear()
        self.finish(call, trailers)

    # limits

    def expire(self, now: float) -> None:
        """Ends a handshake, a message or an idle connection that takes too long."""
        limits = self.limits
        if self.transport is None:
            return
        if not self.handshaken and now - self.since > limits.header_timeout:
            self.transport.close()
        elif not self.streams and now - self.since > limits.idle_timeout:
            self.evict()
        else:
            for call in list(self.streams.values()):
                if call.buffer and now - call.since > limits.body_timeout:
                    self.fail(call, RequestTimeout(f"the message took over {limits.body_timeout:g} s (--body-timeout)"))
            self.flush()

    def evict(self) -> None:
        self.close()


def streamed(future: asyncio.Future, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
    """A ModelInfer outcome as a ModelStreamInfer answer: the response, or the error for this request alone."""
    if future.cancelled():
        return pb.ModelStreamInferResponse(error_message="cancelled")
    error = future.exception()
    if error is None:
        return pb.ModelStreamInferResponse(infer_response=future.result())
    if not isinstance(error, ServingError):
        log.error("unhandled error in ModelStreamInfer", exc_info=error)
        error = ServingError("internal server error")
    return pb.ModelStreamInferResponse(error_message=str(error), infer_response=pb.ModelInferResponse(id=request.id))


def grpc_listener(serving: Serving) -> Listener:
    service = Service(serving)
    return Listener(serving.limits, lambda listener: GrpcConnection(service, listener))
