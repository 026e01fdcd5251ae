"""Compressed requests (HTTP Content-Encoding, gRPC grpc-encoding): gzip and deflate, inflated within limits.

A gzip of zeros inflates a thousand times: 64 KiB of it made 64 MiB, taken whole by zlib before the memory
budget counted any of it (twice that while zlib joined its output). Here the inflated bytes are counted step
by step as they come, so a request holds at most one step outside the budget, and one that does not fit is
refused when the budget is spent, not after.
"""

from __future__ import annotations

import zlib

from edgeloop_runtime.errors import BadRequest, TooLarge
from edgeloop_runtime.limits import MemoryBudget

WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
STEP = 1 << 20  # inflated at a time, before the budget counts it


def inflate(data: bytes, encoding: bytes, budget: MemoryBudget, holder, *, limit: int, flag: str, what: str) -> bytes:
    """`data` (`what`: "the gzip body") inflated; at most `limit` bytes (the limit's `flag` in the error). The
    inflated bytes are held in `budget` by `holder` (anything with a `held` count it gives back when done)."""
    inflater = zlib.decompressobj(WBITS[encoding])
    parts, size = [], 0

    def hold(part: bytes) -> None:
        nonlocal size
        size += len(part)
        if size > limit:
            raise TooLarge(f"{what} exceeds {limit} bytes once decompressed ({flag})")
        budget.reserve(len(part))
        holder.held += len(part)
        parts.append(part)

    try:
        while True:
            part = inflater.decompress(data, STEP)
            data = inflater.unconsumed_tail
            hold(part)
            if not data and len(part) < STEP:
                break
        hold(inflater.flush())
    except zlib.error as error:
        raise BadRequest(f"cannot decompress {what}: {error}") from None
    if len(parts) == 1:
        return parts[0]
    budget.reserve(size)  # the joined copy, while the parts still exist
    joined = b"".join(parts)
    budget.release(size)
    return joined
