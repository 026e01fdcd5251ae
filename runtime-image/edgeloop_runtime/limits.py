"""What one client may cost the server, in bytes, counts and time: every serving limit, in one place.

Each field is a `serve` flag (the field's name with dashes) with its default; docs/security.md lists them.
The memory budget is shared by every request of both protocols: a request holds its head, its body and
the copies its decoding makes until its answer is written, and one that does not fit waits for nothing:
it is refused with 503/UNAVAILABLE (413/RESOURCE_EXHAUSTED when it could never fit).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from edgeloop_runtime.errors import TooLarge, Unavailable

MiB = 1 << 20


def _flag(help_text: str) -> dict:
    return {"help": help_text}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = field(
        default=64 * MiB, metadata=_flag("largest request body or gRPC message (HTTP 413, gRPC RESOURCE_EXHAUSTED)")
    )
    max_json_bytes: int = field(
        default=16 * MiB,
        metadata=_flag("largest JSON part of an HTTP request (parsed JSON takes up to 8x its size while decoded)"),
    )
    max_inflight_bytes: int = field(
        default=256 * MiB,
        metadata=_flag("memory budget of all requests in the server: heads, bodies, messages and decoded copies"),
    )
    max_tensor_elements: int = field(
        default=1 << 24,
        metadata=_flag("elements of one input tensor, and the largest dimension; checked before any decoding"),
    )
    max_request_line_bytes: int = field(default=8192, metadata=_flag("longest HTTP request line (431)"))
    max_header_bytes: int = field(default=16384, metadata=_flag("HTTP request line and headers together (431)"))
    max_headers: int = field(default=100, metadata=_flag("HTTP header fields per request (431)"))
    max_pipelined: int = field(
        default=16, metadata=_flag("HTTP requests queued behind the one being answered on a connection")
    )
    max_connections: int = field(
        default=1024,
        metadata=_flag("connections per protocol; at the cap a new HTTP one closes the longest idle, or is refused"),
    )
    max_grpc_streams: int = field(default=64, metadata=_flag("concurrent gRPC calls (streams) per connection"))
    max_grpc_calls: int = field(
        default=256, metadata=_flag("concurrent gRPC calls in the server; beyond, RESOURCE_EXHAUSTED")
    )
    max_shm_regions: int = field(default=64, metadata=_flag("registered system shared memory regions"))
    header_timeout: float = field(
        default=10.0, metadata=_flag("seconds to receive an HTTP request's head (and a TLS or HTTP/2 handshake)")
    )
    body_timeout: float = field(default=60.0, metadata=_flag("seconds to receive an HTTP body or a gRPC request"))
    idle_timeout: float = field(
        default=60.0,
        metadata=_flag(
            "seconds an idle connection (or gRPC stream) stays open, and a client may take nothing of its answers"
        ),
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        for f in fields(cls):
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                type=_positive(float if f.type == "float" else int),
                default=f.default,
                metavar="N",
                help=f"{f.metadata['help']} (default %(default)s)",
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Limits:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


class MemoryBudget:
    """Bytes that requests hold at once. Used from the event loop's thread only, so it needs no lock."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def reserve(self, size: int) -> None:
        """Takes `size` bytes or raises: TooLarge when they could never fit, Unavailable when not now."""
        if size > self.total:
            raise TooLarge(f"the request needs {size} bytes of memory, more than --max-inflight-bytes ({self.total})")
        if self.used + size > self.total:
            raise Unavailable(
                f"the server holds {self.used} bytes of requests; this one needs {size} more than "
                f"--max-inflight-bytes ({self.total}) allows now; retry later"
            )
        self.used += size

    def hold(self, size: int) -> None:
        """Counts `size` bytes that are held already and cannot be refused (answers waiting for a slow reader)."""
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size
