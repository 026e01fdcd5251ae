"""The runtime's HTTP/2 layer (edgeloop_runtime.http2) as a pure protocol machine, fed bytes by a test instead of
a socket: whatever way a client's bytes are cut, each stream gets its data once and whole; what a client sends
costs the server in proportion (one pass over the streams per SETTINGS frame); the windows it was given bound
what it may send."""

from __future__ import annotations

import pytest
from edgeloop_runtime import http2
from edgeloop_runtime.http2 import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PADDED,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    STREAM_WINDOW,
    Http2Connection,
    Stream,
    frame,
    literal,
)
from edgeloop_runtime.limits import MemoryBudget
from hypothesis import given, settings
from hypothesis import strategies as st


class Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        out, data = [], bytes(self.written)
        while len(data) >= 9:
            length = int.from_bytes(data[:3], "big")
            out.append((data[3], data[4], int.from_bytes(data[5:9], "big"), data[9 : 9 + length]))
            data = data[9 + length :]
        return out


class Connection(Http2Connection):
    """Records what each stream receives."""

    def __init__(self) -> None:
        super().__init__(max_streams=64, max_header_bytes=16384, budget=MemoryBudget(1 << 30))
        self.received: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.transport_ = Transport()
        self.connection_made(self.transport_)

    def flush_later(self) -> None:  # no event loop here
        self.flush()

    def stream_opened(self, stream: Stream, headers: dict[bytes, bytes]) -> None:
        self.received[stream.id] = bytearray()

    def stream_data(self, stream: Stream, data: bytes, ended: bool) -> None:
        assert stream.id not in self.ended, "data after the stream's end"
        self.received[stream.id] += data
        if ended:
            self.ended.add(stream.id)


def opening(*stream_ids: int) -> bytes:
    return (
        PREFACE
        + frame(SETTINGS, 0, 0)
        + b"".join(frame(HEADERS, END_HEADERS, i, literal(b":path", b"/x")) for i in stream_ids)
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([1, 3, 5]), st.binary(max_size=3000), st.none() | st.integers(0, 255))),
    st.lists(st.integers(1, 20000), min_size=1),
)
def test_data_arrives_whole_however_the_bytes_are_cut(chunks, cuts):
    """DATA frames, padded or not, fed in pieces of any size: each stream gets exactly its data, then its end."""
    wire = [opening(1, 3, 5)]
    expected = {1: bytearray(), 3: bytearray(), 5: bytearray()}
    for stream_id, data, pad in chunks:
        payload = data if pad is None else bytes((pad,)) + data + b"\0" * pad
        wire.append(frame(DATA, 0 if pad is None else PADDED, stream_id, payload))
        expected[stream_id] += data
    wire += [frame(DATA, END_STREAM, i, b"end") for i in expected]
    data = b"".join(wire)
    connection = Connection()
    position, step = 0, 0
    while position < len(data):
        size = cuts[step % len(cuts)]
        connection.data_received(data[position : position + size])
        position, step = position + size, step + 1
    assert not connection.transport_.closed
    assert {i: bytes(v) for i, v in connection.received.items()} == {i: bytes(v) + b"end" for i, v in expected.items()}
    assert connection.ended == {1, 3, 5}
    assert len(connection.buffer) == 0


def test_an_unfinished_frame_is_held_by_its_stream_not_the_connection():
    """A DATA frame announced at 256 KiB whose bytes trickle in: what arrived is its stream's already (counted
    by the budget there), not a frame buffered whole by the connection."""
    connection = Connection()
    connection.data_received(opening(1))
    connection.data_received(http2.MAX_FRAME.to_bytes(3, "big") + bytes((DATA, 0)) + (1).to_bytes(4, "big"))
    connection.data_received(b"x" * 100_000)
    assert len(connection.received[1]) == 100_000
    assert len(connection.buffer) == 0


def test_a_frame_of_another_kind_beyond_the_header_limit_ends_the_connection_at_its_header():
    connection = Connection()
    connection.data_received(opening() + (40000).to_bytes(3, "big") + bytes((0x6, 0)) + bytes(4))  # PING
    assert connection.transport_.closed


class CountingStream(Stream):
    """A stream that counts how often its send window is changed."""

    __slots__ = ("_window", "changes")

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.changes = 0
        super().__init__(stream_id, send_window)

    @property
    def send_window(self) -> int:
        return self._window

    @send_window.setter
    def send_window(self, value: int) -> None:
        self.changes += 1
        self._window = value


def test_a_settings_frame_walks_the_streams_once():
    """5000 INITIAL_WINDOW_SIZE values in one frame (64 streams open): each stream's window once moved 5000
    times (a 256 KiB frame cost 0.1 s of CPU); now once, to the last value."""
    connection = Connection()
    connection.stream_class = CountingStream
    connection.data_received(opening(*range(1, 129, 2)))
    entries = b"".join((4).to_bytes(2, "big") + (70000 + i).to_bytes(4, "big") for i in range(5000))
    connection.data_received(frame(SETTINGS, 0, 0, entries))
    streams = list(connection.streams.values())
    assert len(streams) == 64
    assert all(stream.changes == 2 for stream in streams)  # set at its opening, moved once
    assert all(stream.send_window == 70000 + 4999 for stream in streams)


def test_a_stream_window_beyond_2_31_is_a_flow_control_error():
    connection = Connection()
    grown = (http2.MAX_WINDOW - 70000).to_bytes(4, "big")
    connection.data_received(opening(1) + frame(http2.WINDOW_UPDATE, 0, 1, grown))
    connection.data_received(frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + http2.MAX_WINDOW.to_bytes(4, "big")))
    assert connection.transport_.closed
    goaway = [payload for kind, _, _, payload in connection.transport_.frames() if kind == http2.GOAWAY]
    assert int.from_bytes(goaway[0][4:8], "big") == http2.FLOW_CONTROL_ERROR


def test_data_beyond_the_stream_window_resets_the_stream():
    """The server gives a stream STREAM_WINDOW bytes; a client that sends more has its stream reset
    (FLOW_CONTROL_ERROR) instead of its bytes being held."""
    connection = Connection()
    connection.data_received(opening(1))
    connection.data_received(frame(DATA, 0, 1, b"x" * 16384) * (STREAM_WINDOW // 16384) + frame(DATA, 0, 1, b"y"))
    resets = [payload for kind, _, stream, payload in connection.transport_.frames() if kind == RST_STREAM]
    assert resets == [http2.FLOW_CONTROL_ERROR.to_bytes(4, "big")]
    assert len(connection.received[1]) == STREAM_WINDOW
    assert not connection.transport_.closed


@pytest.mark.parametrize(
    "block",
    [b"\x20" * 3, b"\x82\x20", b"\x00\x7f" + b"\xff" * 5 + b"\x01"],
    ids=["three-size-updates", "update-after-field", "integer-beyond-2^28"],
)
def test_header_blocks_that_would_be_costly_to_decode_are_refused_unread(block):
    with pytest.raises(http2.ConnectionError_) as error:
        http2._changes_table(block)
    assert error.value.code == http2.COMPRESSION_ERROR
