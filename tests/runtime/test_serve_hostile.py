"""Hostile clients against the real server on loopback: malformed, oversized, pipelined, slow and flooding, on HTTP
and gRPC. After each case the server answers a good request at once, holds no memory for the attack any more,
and has logged no traceback. Each case takes a few seconds; the limits are set low where time is involved."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import ExitStack, closing

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import memory_mb, raw_request, save, start_server
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

MiB = 1 << 20
INFER = "/v2/models/model/infer"
GOOD_BODY = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]})
# Short timeouts so that the slow cases end in seconds; a cap on connections that the floods exceed.
LIMITS = (
    "--header-timeout", "1", "--body-timeout", "2", "--idle-timeout", "2", "--max-connections", "128",
    "--max-inflight-bytes", str(64 * MiB), "--max-body-bytes", str(32 * MiB), "--max-pipelined", "16",
)  # fmt: skip


@pytest.fixture(scope="module")
def server(mlp_path, tmp_path_factory):
    # 1024 open files, as many container runtimes give by default: the floods must not exhaust them
    server = start_server(mlp_path, *LIMITS, log_dir=tmp_path_factory.mktemp("logs"), max_files=1024)
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def dynamic_path(tmp_path_factory):
    """x FP32 [N, M] → y = x: both dimensions any size."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])],
    )
    return save(helper.make_model(graph), tmp_path_factory.mktemp("models") / "dynamic.onnx")


HELD = ("edgeloop_inflight_requests", "nv_inference_pending_request_count", "edgeloop_inflight_bytes")


def metric(server, name: str) -> float:
    _, text = raw_request(server, "GET", "/metrics")
    return float(next(line for line in text.decode().splitlines() if line.startswith(name + "{")).split()[-1])


def assert_serves_a_good_request(server, settle: bool = True) -> None:
    """A good request is answered at once (2 s is hundreds of times its normal latency); with `settle`, the
    server soon holds nothing for the attack any more (no request, no queued one, no memory)."""
    started = time.monotonic()
    with closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=2)) as sock:
        sock.sendall(post(INFER, GOOD_BODY.encode()))
        status, _, body = read_response(sock.makefile("rb"))
    assert status == 200, body
    assert time.monotonic() - started < 2
    if not settle:
        return
    deadline = time.monotonic() + 5
    while True:  # the server notices closed connections on its next loop iteration
        held = {name: metric(server, name) for name in HELD}
        held["edgeloop_inflight_bytes"] //= 1024  # what the /metrics request itself holds: its head
        if not any(held.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not any(held.values()), held
    assert "Traceback" not in server.output()


def post(path: str, body: bytes, headers: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def read_response(reader) -> tuple[int, dict[str, str], bytes]:
    """One response from a buffered socket file (responses follow each other on a pipelined connection)."""
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, reader.read(int(headers.get("content-length", 0)))


def send_ignoring_reset(sock: socket.socket, data: bytes, chunk: int = MiB) -> int:
    """Sends what the server takes; returns the bytes sent before it closed the connection."""
    sent = 0
    try:
        for start in range(0, len(data), chunk):
            sock.sendall(data[start : start + chunk])
            sent += min(chunk, len(data) - start)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def answer_or_reset(sock: socket.socket) -> int | None:
    """The status the server answered before closing, or None when the close reset the connection."""
    try:
        return read_response(sock.makefile("rb"))[0]
    except (ConnectionError, TimeoutError, ValueError):
        return None


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes the connection (after any answer) within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


# HTTP: pipelining


def test_pipelined_flood_is_answered_in_order_then_closed(server):
    """One inference and 2000 pipelined health checks in one write (it recursed once: RecursionError,
    500s, a leaked in-flight count)."""
    burst = post(INFER, GOOD_BODY.encode()) + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
    statuses = []
    with closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=5)) as sock:
        sock.sendall(burst)
        reader = sock.makefile("rb")
        while True:
            try:
                status, headers, _ = read_response(reader)
            except ConnectionError:
                break
            statuses.append(status)
            if headers.get("connection") == "close":
                break
    assert statuses[0] == 200
    assert set(statuses) == {200}, f"{statuses.count(500)} answers were 500"
    assert 16 <= len(statuses) <= 2001  # the server may stop reading at --max-pipelined and close
    assert_serves_a_good_request(server)


# HTTP: oversized heads


def test_a_header_without_end_is_cut_off_at_the_head_limit(server):
    """64 MiB of one header value (204 MiB once took 316 MB of memory and delayed others by 9.6 s)."""
    before = memory_mb(server.proc.pid)[1]
    with closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=5)) as sock:
        sent = send_ignoring_reset(sock, b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * (64 * MiB))
        assert answer_or_reset(sock) in (431, None)
    assert sent < 64 * MiB, "the server read the whole header"
    assert memory_mb(server.proc.pid)[1] - before < 16
    assert_serves_a_good_request(server)


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", "head exceeds 16384 bytes"),
        (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", "request line exceeds 8192 bytes"),
        (
            b"GET /v2/health/live HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
            "more than 100 header fields",
        ),
    ],
    ids=["header-bytes", "request-line", "header-count"],
)
def test_an_oversized_head_is_431(server, head, message):
    with closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=5)) as sock:
        sock.sendall(head)
        status, headers, body = read_response(sock.makefile("rb"))
    assert status == 431
    assert message in json.loads(body)["error"]
    assert headers["connection"] == "close"
    assert_serves_a_good_request(server)


def test_two_million_header_fields_are_not_read(server):
    """2,000,000 distinct headers were once all accepted (585 MB, then a 200)."""
    before = memory_mb(server.proc.pid)[1]
    head = b"GET /v2/health/live HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(2_000_000))
    with closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=5)) as sock:
        send_ignoring_reset(sock, head)
        assert answer_or_reset(sock) in (431, None)
    assert memory_mb(server.proc.pid)[1] - before < 16
    assert_serves_a_good_request(server)


# HTTP: bodies and the memory budget


def test_oversized_body_is_413_without_reading_it_into_memory(server):
    before = memory_mb(server.proc.pid)[1]
    with closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=5)) as sock:
        send_ignoring_reset(sock, post(INFER, b"x" * (48 * MiB)))
        status, _, body = read_response(sock.makefile("rb"))
    assert status == 413
    assert "exceeds 33554432 bytes (--max-body-bytes)" in json.loads(body)["error"]
    assert memory_mb(server.proc.pid)[1] - before < 16
    assert_serves_a_good_request(server)


def test_partial_bodies_are_bounded_by_the_memory_budget(server):
    """16 bodies of 30 MiB, each sent in part and left hanging (16 partial 64 MiB bodies once took 1 GB):
    two fit the 64 MiB budget (their buffers are taken whole), the others are refused with 503 and their bytes
    dropped as they come."""
    rss_before = memory_mb(server.proc.pid)[0]
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {30 * MiB}\r\n\r\n".encode()
    with ExitStack() as stack:
        sockets = [
            stack.enter_context(closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=5)))
            for _ in range(16)
        ]
        for sock in sockets:
            sock.sendall(head + b"{" * (8 * MiB))
        time.sleep(0.5)
        held = memory_mb(server.proc.pid)[0] - rss_before
        reserved = metric(server, "edgeloop_inflight_bytes")
        assert 60 * MiB < reserved < 64 * MiB  # two bodies of 30 MiB and their heads
        assert_serves_a_good_request(server, settle=False)  # a small request still fits
    assert held < 64 + 16, f"the server held {held:.0f} MB with a budget of 64 MiB"
    assert_serves_a_good_request(server)


def test_a_lying_chunked_body_is_cut_at_the_body_limit(server):
    chunk = b"%x\r\n%s\r\n" % (MiB, b"a" * MiB)
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    with closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=5)) as sock:
        send_ignoring_reset(sock, head + chunk * 40 + b"0\r\n\r\n")
        assert answer_or_reset(sock) in (413, None)
    assert_serves_a_good_request(server)


# HTTP: slow clients and floods


def test_slowloris_heads_are_cut_at_the_header_timeout(server):
    """200 connections trickling a head (more than the 128 allowed): a good client is served meanwhile
    (the longest-waiting head makes room), and each trickler gets 408 after --header-timeout (1 s)."""
    with ExitStack() as stack:
        tricklers = []
        for _ in range(200):
            sock = stack.enter_context(closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=5)))
            send_ignoring_reset(sock, b"GET /v2/health/live HTTP/1.1\r\n")
            tricklers.append(sock)
        stop = threading.Event()

        def trickle():
            while not stop.wait(0.2):
                for sock in tricklers:
                    send_ignoring_reset(sock, b"X: y\r\n")

        thread = threading.Thread(target=trickle)
        thread.start()
        try:
            assert_serves_a_good_request(server)
            time.sleep(2)
            assert all(closed_by_server(sock, within=2) for sock in tricklers)
        finally:
            stop.set()
            thread.join()
    assert_serves_a_good_request(server)


def test_a_trickled_body_is_cut_at_the_body_timeout(server):
    with closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=5)) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())
        started = time.monotonic()
        for _ in range(20):
            if send_ignoring_reset(sock, b" ") == 0:
                break
            time.sleep(0.25)
        status, _, body = read_response(sock.makefile("rb"))
    assert status == 408
    assert "--body-timeout" in json.loads(body)["error"]
    assert 1.5 < time.monotonic() - started < 4
    assert_serves_a_good_request(server)


def test_idle_connections_beyond_the_cap_make_room_and_time_out(server):
    """1500 idle connections (5000 once made a good request fail with ECONNRESET, none closed after 20 s):
    the longest idle makes room for a new one, and --idle-timeout (2 s) closes the rest."""
    with ExitStack() as stack:
        idle = [
            stack.enter_context(closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=5)))
            for _ in range(1500)
        ]
        assert_serves_a_good_request(server)
        time.sleep(2)
        assert all(closed_by_server(sock, within=2) for sock in idle[-100:])
    assert_serves_a_good_request(server)


def test_a_flood_of_requests_gets_answers_or_503(server):
    """64 connections sending as fast as they are answered: every request gets 200 or 503."""
    statuses: list[int] = []

    def flood():
        with closing(socket.create_connection(("127.0.0.1", server.http_port), timeout=5)) as sock:
            reader = sock.makefile("rb")
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                sock.sendall(post(INFER, GOOD_BODY.encode()))
                statuses.append(read_response(reader)[0])

    threads = [threading.Thread(target=flood) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses and set(statuses) <= {200, 503}
    assert_serves_a_good_request(server)


# decoding: shapes and element counts are checked before any data is decoded


def test_giant_zero_size_dimension_is_400_and_invalid_argument(dynamic_path, server_factory):
    """A zero-size tensor with a dimension of 2^62 was once a 500 and an UNKNOWN with a traceback."""
    server = server_factory(dynamic_path, "--max-batch-size", "0")
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 2**62], "data": []}]})
    response, data = raw_request(server, "POST", INFER, body.encode())
    assert response.status == 400
    assert "no dimension may exceed 16777216 (--max-tensor-elements)" in json.loads(data)["error"]
    request = pb.ModelInferRequest(model_name="model")
    request.inputs.add(name="x", datatype="FP32", shape=[2**62, 0])
    request.raw_input_contents.append(b"")
    with grpc.insecure_channel(server.grpc_url) as channel, pytest.raises(grpc.RpcError) as error:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no dimension may exceed" in error.value.details()
    assert "Traceback" not in server.output()


def test_too_many_elements_is_413_before_decoding(dynamic_path, server_factory):
    server = server_factory(dynamic_path, "--max-batch-size", "0", "--max-tensor-elements", "1000")
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 600], "data": [0] * 1200}]})
    response, data = raw_request(server, "POST", INFER, body.encode())
    assert response.status == 413
    assert "input 'x' has 1200 elements, more than 1000 (--max-tensor-elements)" in json.loads(data)["error"]


def test_a_huge_bytes_request_is_refused_before_its_strings_are_made(tmp_path, server_factory):
    """5,000,000 BYTES elements in a 20 MB body, batch size far beyond the model's 8 (a 60 MB one once
    peaked at 1.44 GB and stalled health checks for 6.2 s before its 400)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 2])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["N", 2])],
    )
    server = server_factory(save(helper.make_model(graph), tmp_path / "echo.onnx"))
    before = memory_mb(server.proc.pid)[1]
    data = np.zeros(5_000_000, "<u4").tobytes()  # every element empty: a 4-byte length of 0
    header = json.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2_500_000, 2],
                     "parameters": {"binary_data_size": len(data)}}]}
    ).encode()  # fmt: skip
    started = time.monotonic()
    response, body = raw_request(
        server, "POST", INFER, header + data, {"Inference-Header-Content-Length": str(len(header))}
    )
    assert response.status == 400
    assert "batch size 2500000 is outside 1..8" in json.loads(body)["error"]
    assert time.monotonic() - started < 2
    assert memory_mb(server.proc.pid)[1] - before < 60  # the body and its copy; no strings


# gRPC


@pytest.fixture
def grpc_client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield client


def assert_grpc_serves_a_good_request(server) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        tensor = grpcclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.full((1, 64), 0.5, np.float32))
        assert client.infer("model", [tensor], client_timeout=2).as_numpy("label").shape == (1,)
    assert_serves_a_good_request(server)


def test_grpc_garbage_and_silent_connections_are_closed(server):
    """Bytes that are not HTTP/2, and connections that never start (the handshake once waited 120 s)."""
    with closing(socket.create_connection(("127.0.0.1", server.grpc_port), timeout=5)) as sock:
        sock.sendall(b"\x00garbage that is no HTTP/2 preface" * 100)
        assert closed_by_server(sock, within=3)
    with ExitStack() as stack:
        silent = [
            stack.enter_context(closing(socket.create_connection(("127.0.0.1", server.grpc_port), timeout=5)))
            for _ in range(200)
        ]
        assert all(closed_by_server(sock, within=3) for sock in silent)
    assert_grpc_serves_a_good_request(server)


def test_grpc_messages_beyond_the_memory_budget_are_unavailable(server):
    """12 calls of 8 MiB at once against a 64 MiB budget: each is answered, or refused with UNAVAILABLE."""
    x = np.zeros((1, 64), np.float32)
    request = pb.ModelInferRequest(model_name="model")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(x.tobytes())
    request.parameters["padding"].string_param = "p" * (8 * MiB)
    codes: list[grpc.StatusCode] = []
    with grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        futures = [stub.ModelInfer.future(request, timeout=10) for _ in range(12)]
        for future in futures:
            try:
                future.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    assert grpc.StatusCode.OK in codes
    assert_grpc_serves_a_good_request(server)


def test_grpc_bad_input_is_invalid_argument_with_the_errors_own_code(grpc_client):
    tensor = grpcclient.InferInput("input", [1, 64], "FP16")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float16))
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer("model", [tensor])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as error:
        grpc_client.get_model_metadata("nope")
    assert error.value.status() == "StatusCode.NOT_FOUND"


# gRPC's HTTP/2, frame by frame: what no well-behaved client sends


def h2_connect(server) -> socket.socket:
    from edgeloop_runtime.http2 import PREFACE, SETTINGS, frame

    sock = socket.create_connection(("127.0.0.1", server.grpc_port), timeout=5)
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
    return sock


def h2_call_headers(stream_id: int, end_headers: bool = True) -> bytes:
    from edgeloop_runtime.http2 import END_HEADERS, HEADERS, frame, literal

    block = b"".join(
        literal(name, value)
        for name, value in (
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
            (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        )
    )  # fmt: skip
    return frame(HEADERS, END_HEADERS if end_headers else 0, stream_id, block)


def h2_frames(sock: socket.socket, until: float):
    """The frames the server sends, as (kind, flags, stream, payload), until it closes or `until` passes."""
    buffer = b""
    sock.settimeout(0.2)
    while time.monotonic() < until:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionError:
            return
        if not data:
            return
        buffer += data
        while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
            length = int.from_bytes(buffer[:3], "big")
            yield buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF, buffer[9 : 9 + length]
            buffer = buffer[9 + length :]


def grpc_status(sock: socket.socket, stream_id: int, within: float = 5) -> tuple[int, str]:
    import hpack
    from edgeloop_runtime.http2 import HEADERS

    decoder = hpack.Decoder()
    for kind, _, stream, payload in h2_frames(sock, time.monotonic() + within):
        if kind == HEADERS:
            headers = dict(decoder.decode(payload, raw=True))
            if stream == stream_id and b"grpc-status" in headers:
                return int(headers[b"grpc-status"]), headers.get(b"grpc-message", b"").decode()
    raise AssertionError("no gRPC status")


def test_grpc_message_beyond_the_limit_is_refused_from_its_length_prefix(server):
    """A message announcing 1 GiB is refused as soon as its 5-byte prefix arrives, unread."""
    from edgeloop_runtime.http2 import DATA, frame

    with closing(h2_connect(server)) as sock:
        sock.sendall(h2_call_headers(1) + frame(DATA, 0, 1, b"\0" + (1 << 30).to_bytes(4, "big")))
        code, message = grpc_status(sock, 1)
    assert code == 8 and "--max-body-bytes" in message  # RESOURCE_EXHAUSTED
    assert_grpc_serves_a_good_request(server)


def test_grpc_message_sent_too_slowly_times_out(server):
    from edgeloop_runtime.http2 import DATA, frame

    with closing(h2_connect(server)) as sock:
        sock.sendall(h2_call_headers(1) + frame(DATA, 0, 1, b"\0" + (100).to_bytes(4, "big") + b"x" * 10))
        code, message = grpc_status(sock, 1, within=6)
    assert code == 4 and "--body-timeout" in message  # DEADLINE_EXCEEDED
    assert_grpc_serves_a_good_request(server)


def test_grpc_streams_beyond_the_cap_are_refused(server):
    """100 calls opened at once on one connection: beyond --max-grpc-streams (64), REFUSED_STREAM."""
    from edgeloop_runtime.http2 import RST_STREAM

    with closing(h2_connect(server)) as sock:
        sock.sendall(b"".join(h2_call_headers(2 * i + 1) for i in range(100)))
        refused = {
            stream
            for kind, _, stream, payload in h2_frames(sock, time.monotonic() + 2)
            if kind == RST_STREAM and int.from_bytes(payload, "big") == 0x7
        }
    assert len(refused) == 100 - 64
    assert_grpc_serves_a_good_request(server)


def test_grpc_header_block_without_end_closes_the_connection(server):
    """HEADERS followed by CONTINUATION frames that never end the block (a CONTINUATION flood)."""
    from edgeloop_runtime.http2 import CONTINUATION, GOAWAY, frame

    before = memory_mb(server.proc.pid)[1]
    with closing(h2_connect(server)) as sock:
        sent = send_ignoring_reset(
            sock, h2_call_headers(1, end_headers=False) + frame(CONTINUATION, 0, 1, b"\0" * 16384) * 2000
        )
        goaway = [payload for kind, _, _, payload in h2_frames(sock, time.monotonic() + 3) if kind == GOAWAY]
    assert goaway and int.from_bytes(goaway[0][4:8], "big") == 0xB  # ENHANCE_YOUR_CALM
    assert sent < 2000 * 16393, "the server stopped reading"
    assert memory_mb(server.proc.pid)[1] - before < 16
    assert_grpc_serves_a_good_request(server)
