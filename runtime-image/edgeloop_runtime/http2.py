"""The server side of HTTP/2 (RFC 9113), as much as gRPC needs: frames, streams, flow control, and HPACK.

Written here rather than taken from the h2 library because a call must cost microseconds: h2 spent about
100 µs of pure Python per unary call on the 2-core machine (its HPACK decoder alone 60), more than the rest
of the call. Header blocks are decoded by the hpack library, and a block of indexed fields only (what gRPC
clients send once the first call has filled the dynamic table) is decoded once and looked up afterwards, as
long as the table does not change. Responses use fixed header blocks that never touch the dynamic table.

A subclass gives streams their meaning (`stream_class`, `stream_opened`, `stream_data`, `drop`) and answers
with `send` and `finish`; this class keeps the protocol's rules and its bounds: frame size, header block
size, concurrent streams (REFUSED_STREAM beyond), and the windows both ways.
"""

from __future__ import annotations

import asyncio
from collections import deque

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x8, 0x9, 0xB
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
MAX_FRAME = 1 << 18  # what we accept (advertised; larger than the default 16 KiB: fewer frames per tensor)
STREAM_WINDOW = 1 << 20  # advertised per stream: a 600 KB tensor arrives without waiting for window updates
CONNECTION_WINDOW = 16 << 20


class ConnectionError_(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big") + payload


def integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK's integer representation (RFC 7541 5.1), its first byte or'ed with `first`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes | int, value: bytes) -> bytes:
    """A header field "without indexing" (RFC 7541 6.2.2): the dynamic tables on both sides stay untouched.
    `name` is the field's name, or the index of a static table entry with that name."""
    head = integer(name, 4) if isinstance(name, int) else b"\x00" + integer(len(name), 7) + name
    return head + integer(len(value), 7) + value


class Stream:
    """One HTTP/2 stream: what is left to send while the client's window is shut, and whether each side ended."""

    __slots__ = ("id", "outbox", "remote_ended", "send_window")

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.outbox: deque[tuple[bytes, bool]] = deque()  # (payload, is the trailers' header block)
        self.remote_ended = False


class Http2Connection(asyncio.Protocol):
    def __init__(self, max_streams: int, max_header_bytes: int) -> None:
        self.max_streams = max_streams
        self.max_header_bytes = max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.buffer = bytearray()
        self.output: list[bytes] = []
        self.preface = False
        self.handshaken = False  # the client's first SETTINGS arrived
        self.last_stream_id = 0
        self.send_window = DEFAULT_WINDOW
        self.receive_window = CONNECTION_WINDOW
        self.credits: dict[int, int] = {0: 0}  # consumed bytes to give back to windows, by stream (0: the connection)
        self.going_away = False  # the client sent GOAWAY: the connection closes when its last stream does
        self.flushing = False  # a flush is scheduled for the end of this event-loop turn
        self.later: asyncio.TimerHandle | None = None  # a flush scheduled in a millisecond
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.continuation: tuple[int, int, bytearray] | None = None  # stream, flags, header block so far
        self.decoder = hpack.Decoder(max_header_list_size=max_header_bytes)
        self.decoded: dict[bytes, dict[bytes, bytes]] = {}  # blocks of indexed fields only, while the table holds

    # what a subclass gives streams

    stream_class: type[Stream] = Stream

    def stream_opened(self, stream: Stream, headers: dict[bytes, bytes]) -> None:
        raise NotImplementedError

    def stream_data(self, stream: Stream, data: bytes, ended: bool) -> None:
        raise NotImplementedError

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        settings = b"".join(
            key.to_bytes(2, "big") + value.to_bytes(4, "big")
            for key, value in ((0x3, self.max_streams), (0x4, STREAM_WINDOW), (0x5, MAX_FRAME),
                               (0x6, self.max_header_bytes))
        )  # fmt: skip
        self.output.append(frame(SETTINGS, 0, 0, settings))
        self.output.append(frame(WINDOW_UPDATE, 0, 0, (CONNECTION_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big")))
        self.flush()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        try:
            if not self.preface:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buffer)):
                        raise ConnectionError_(PROTOCOL_ERROR, "not the HTTP/2 connection preface")
                    return
                if not buffer.startswith(PREFACE):
                    raise ConnectionError_(PROTOCOL_ERROR, "not the HTTP/2 connection preface")
                del buffer[: len(PREFACE)]
                self.preface = True
            position, end = 0, len(buffer)
            while end - position >= 9:
                length = int.from_bytes(buffer[position : position + 3], "big")
                if length > MAX_FRAME:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                if end - position - 9 < length:
                    break
                kind, flags = buffer[position + 3], buffer[position + 4]
                stream_id = int.from_bytes(buffer[position + 5 : position + 9], "big") & MAX_WINDOW
                payload = bytes(buffer[position + 9 : position + 9 + length])
                position += 9 + length
                self._frame(kind, flags, stream_id, payload)
                if self.transport is None:
                    return
            del buffer[:position]
        except ConnectionError_ as error:
            self.close(error.code)
            return
        if self.streams:
            # Calls are in flight: what this read produced (PING and SETTINGS acknowledgements, answers ready at
            # once) goes out with their answers, in the writes those make anyway. gRPC clients ping with most
            # requests (to size their windows); a write of its own for each acknowledgement was one system call
            # per call more than HTTP makes.
            self.flush_later()
        else:
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for stream in list(self.streams.values()):
            self.drop(stream)

    # receiving

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is not None and kind != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            if self.continuation is None or self.continuation[0] != stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            block = self.continuation[2]
            block += payload
            if len(block) > 2 * self.max_header_bytes:
                raise ConnectionError_(ENHANCE_YOUR_CALM, "a header block beyond --max-header-bytes")
            if flags & END_HEADERS:
                first_flags = self.continuation[1]
                self.continuation = None
                self._header_block(stream_id, first_flags, bytes(block))
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == PING:
            if stream_id or len(payload) != 8:
                raise ConnectionError_(FRAME_SIZE_ERROR if stream_id == 0 else PROTOCOL_ERROR, "a bad PING")
            if not flags & ACK:
                self.output.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if stream_id == 0 or len(payload) != 4:
                raise ConnectionError_(PROTOCOL_ERROR, "a bad RST_STREAM")
            stream = self.streams.get(stream_id)
            if stream is not None:
                self.drop(stream)
        elif kind == GOAWAY:
            self.going_away = True
            if not self.streams:
                self.close(NO_ERROR)
        elif kind == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "a client cannot push")
        # PRIORITY and unknown kinds are ignored

    def _unpad(self, flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ConnectionError_(PROTOCOL_ERROR, "padding beyond the frame")
            return payload[1 : len(payload) - payload[0]]
        return payload

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on a stream a client cannot open")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, block)
        else:
            self.continuation = (stream_id, flags, bytearray(block))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)  # always: HPACK's state follows every block
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers: only the end of the stream counts
            if not flags & END_STREAM:
                raise ConnectionError_(PROTOCOL_ERROR, "trailers without END_STREAM")
            self._ended(stream)
            return
        if stream_id <= self.last_stream_id:
            return  # a stream this side has reset: its frames in flight are dropped
        self.last_stream_id = stream_id
        if len(self.streams) >= self.max_streams:
            self.output.append(frame(RST_STREAM, 0, stream_id, REFUSED_STREAM.to_bytes(4, "big")))
            return
        stream = self.streams[stream_id] = self.stream_class(stream_id, self.peer_initial_window)
        self.stream_opened(stream, headers)
        if flags & END_STREAM and self.streams.get(stream_id) is stream:
            self._ended(stream)

    def _decode(self, block: bytes) -> dict[bytes, bytes]:
        headers = self.decoded.get(block)
        if headers is not None:
            return headers
        try:
            headers = dict(self.decoder.decode(block, raw=True))
            changes_table = _changes_table(block)
        except (hpack.HPACKError, IndexError) as error:
            raise ConnectionError_(COMPRESSION_ERROR, f"header block: {error}") from None
        if changes_table or len(self.decoded) >= 64:
            self.decoded.clear()  # the table changed: what the cached blocks meant may have changed too
        if not changes_table:
            self.decoded[block] = headers
        return headers

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        self.receive_window -= len(payload)
        if self.receive_window < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        self.credit(0, len(payload))  # the memory budget bounds what is held, not the window
        data = self._unpad(flags, payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream this side has closed or reset
        if stream.remote_ended:
            self.reset(stream, 0x5)  # STREAM_CLOSED
            return
        ended = bool(flags & END_STREAM)
        stream.remote_ended = ended
        self.stream_data(stream, data, ended)

    def _ended(self, stream: Stream) -> None:
        stream.remote_ended = True
        self.stream_data(stream, b"", True)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id or len(payload) % 6:
            raise ConnectionError_(PROTOCOL_ERROR, "a bad SETTINGS frame")
        if flags & ACK:
            return
        for offset in range(0, len(payload), 6):
            key = int.from_bytes(payload[offset : offset + 2], "big")
            value = int.from_bytes(payload[offset + 2 : offset + 6], "big")
            if key == 0x4:  # INITIAL_WINDOW_SIZE: every stream's window moves by the difference
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE beyond 2^31-1")
                for stream in self.streams.values():
                    stream.send_window += value - self.peer_initial_window
                self.peer_initial_window = value
            elif key == 0x5:
                if not 16384 <= value <= 16777215:
                    raise ConnectionError_(PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif key == 0x2 and value > 1:
                raise ConnectionError_(PROTOCOL_ERROR, "ENABLE_PUSH out of range")
        self.output.append(frame(SETTINGS, ACK, 0))
        self.handshaken = True
        for stream in list(self.streams.values()):
            self._drain(stream)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "a bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & MAX_WINDOW
        if stream_id == 0:
            if increment == 0 or self.send_window + increment > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR if increment else PROTOCOL_ERROR, "a bad window update")
            self.send_window += increment
            for stream in list(self.streams.values()):
                if stream.outbox:
                    self._drain(stream)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if increment == 0 or stream.send_window + increment > MAX_WINDOW:
            self.reset(stream, FLOW_CONTROL_ERROR if increment else PROTOCOL_ERROR)
            return
        stream.send_window += increment
        self._drain(stream)

    def credit(self, stream_id: int, size: int) -> None:
        """Gives `size` consumed bytes back to the client's window (of the connection when `stream_id` is 0), once
        half a window's worth has gathered: one WINDOW_UPDATE per many requests, not one each."""
        self.credits[stream_id] = self.credits.get(stream_id, 0) + size

    # sending

    def send(self, stream: Stream, data: bytes) -> None:
        """Queues DATA, sent as the client's windows allow."""
        stream.outbox.append((data, False))
        self._drain(stream)

    def finish(self, stream: Stream, block: bytes) -> None:
        """Ends the stream with a header block (trailers), after the data queued before it."""
        stream.outbox.append((block, True))
        self._drain(stream)

    def _drain(self, stream: Stream) -> None:
        outbox, output = stream.outbox, self.output
        while outbox:
            data, trailers = outbox[0]
            if trailers:
                output.append(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, data))
                self.drop(stream)
                if not stream.remote_ended:  # the client need not send the rest of its request
                    output.append(frame(RST_STREAM, 0, stream.id, NO_ERROR.to_bytes(4, "big")))
                return
            window = min(self.send_window, stream.send_window, self.peer_max_frame)
            if window <= 0 and data:
                return
            chunk = data[:window]
            output.append(frame(DATA, 0, stream.id, chunk))
            self.send_window -= len(chunk)
            stream.send_window -= len(chunk)
            if len(chunk) == len(data):
                outbox.popleft()
            else:
                outbox[0] = (data[len(chunk) :], False)

    def reset(self, stream: Stream, code: int) -> None:
        self.output.append(frame(RST_STREAM, 0, stream.id, code.to_bytes(4, "big")))
        self.drop(stream)

    def drop(self, stream: Stream) -> None:
        """Forgets the stream: it ended, or either side reset it (a subclass also gives back what it held)."""
        self.streams.pop(stream.id, None)
        self.credits.pop(stream.id, None)
        if self.going_away and not self.streams:
            self.close(NO_ERROR)

    def flush_later(self) -> None:
        """Flushes with the next answer, or within a millisecond."""
        self._window_updates()
        if self.output and not self.flushing and self.later is None:
            self.later = asyncio.get_running_loop().call_later(0.001, self.flush)

    def flush_soon(self) -> None:
        """Flushes at the end of this event-loop turn: the answers a batch completes together on one connection
        go out in one write (a write is a system call; on 2 cores it was a third of a gRPC call's CPU time)."""
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().call_soon(self.flush)

    def _window_updates(self) -> None:
        for stream_id, size in self.credits.items():
            if size >= (CONNECTION_WINDOW if stream_id == 0 else STREAM_WINDOW) // 2:
                self.output.append(frame(WINDOW_UPDATE, 0, stream_id, size.to_bytes(4, "big")))
                self.credits[stream_id] = 0
                if stream_id == 0:
                    self.receive_window += size

    def flush(self) -> None:
        self.flushing = False
        if self.later is not None:
            self.later.cancel()
            self.later = None
        self._window_updates()
        if self.output and self.transport is not None:
            self.transport.write(b"".join(self.output))
        self.output.clear()

    def close(self, code: int = NO_ERROR) -> None:
        """GOAWAY, then the connection closes once what was written is sent."""
        if self.transport is None:
            return
        self.output.append(frame(GOAWAY, 0, 0, self.last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big")))
        self.flush()
        self.transport.close()


def _changes_table(block: bytes) -> bool:
    """Whether a (well-formed) header block changes the decoder's dynamic table: it adds a field (a literal with
    incremental indexing, RFC 7541 6.2.1) or resizes the table (6.3). Indexed fields and literals without
    indexing leave it alone, so the same bytes decode the same way while it holds."""
    position = 0
    while position < len(block):
        first = block[position]
        if first & 0xC0 == 0x40 or first & 0xE0 == 0x20:
            return True
        if first & 0x80:  # indexed (6.1)
            position = _skip_integer(block, position, 7)
            continue
        name_index = first & 0x0F  # without indexing or never indexed (6.2.2, 6.2.3)
        position = _skip_integer(block, position, 4)
        if name_index == 0:
            position = _skip_string(block, position)
        position = _skip_string(block, position)
    return False


def _skip_integer(block: bytes, position: int, prefix_bits: int) -> int:
    limit = (1 << prefix_bits) - 1
    if block[position] & limit != limit:
        return position + 1
    position += 1
    while block[position] & 0x80:
        position += 1
    return position + 1


def _string_length(block: bytes, position: int) -> tuple[int, int]:
    limit = 0x7F
    value = block[position] & limit
    if value != limit:
        return value, position + 1
    shift, position = 0, position + 1
    while True:
        byte = block[position]
        value += (byte & 0x7F) << shift
        shift += 7
        position += 1
        if not byte & 0x80:
            return value, position


def _skip_string(block: bytes, position: int) -> int:
    length, position = _string_length(block, position)
    return position + length
