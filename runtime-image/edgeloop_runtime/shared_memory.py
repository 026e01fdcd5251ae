"""Triton's system shared-memory extension: clients on the same node pass tensors through POSIX shm objects.

A client creates a shm object (shm_open, as tritonclient.utils.shared_memory does), registers a region of it
under a name, and names that region (with an offset and a size) for an input to read or an output to write.
The server opens only regular files directly inside its `--shared-memory-dir` (where POSIX shm objects live:
/dev/shm), by a key that is one file name, and never follows a link. It reads and writes them with pread and
pwrite on the open descriptor rather than through a mapping, so a client that shrinks its object later gets
an error instead of crashing the server with SIGBUS, and every offset and size is checked against the region.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeloop_runtime.errors import BadRequest, NotFound, ServingError, TooLarge

KEY = re.compile(r"/?[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # one file name, as shm_open takes it
MAX_NAME = 256


class Unsupported(ServingError):
    http_status = 400
    grpc_code = "UNIMPLEMENTED"
    outcome = "bad_request"


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def _where(self, offset: int, size: int, what: str) -> int:
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise BadRequest(
                f"{what}: {size} bytes at offset {offset} do not fit shared memory region '{self.name}' "
                f"({self.byte_size} bytes)"
            )
        return self.offset + offset

    def read(self, offset: int, size: int, what: str) -> np.ndarray:
        """`size` bytes from the region, copied out of the shm object."""
        position = self._where(offset, size, what)
        buffer = np.empty(size, np.uint8)
        if size and os.preadv(self.fd, [buffer], position) != size:
            raise BadRequest(f"{what}: shared memory region '{self.name}' holds fewer bytes than registered")
        return buffer

    def write(self, offset: int, data: memoryview, size: int, what: str) -> None:
        if data.nbytes > size:
            raise BadRequest(
                f"{what} takes {data.nbytes} bytes, more than the {size} bytes given in shared memory region "
                f"'{self.name}'"
            )
        position = self._where(offset, data.nbytes, what)
        if data.nbytes and os.pwritev(self.fd, [data], position) != data.nbytes:
            raise ServingError(f"{what}: could not write shared memory region '{self.name}'")


class SharedMemory:
    """The registered regions; `root` None: the extension is off."""

    def __init__(self, root: Path | None, max_regions: int) -> None:
        self.root = root
        self.max_regions = max_regions
        self.regions: dict[str, Region] = {}

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if self.root is None:
            raise Unsupported("system shared memory is off on this server (serve --shared-memory-dir)")
        if not name or len(name) > MAX_NAME:
            raise BadRequest(f"a shared memory region needs a name of 1 to {MAX_NAME} characters")
        if name in self.regions:
            raise BadRequest(f"shared memory region '{name}' is already registered")
        if len(self.regions) >= self.max_regions:
            raise TooLarge(f"{self.max_regions} shared memory regions are registered (--max-shm-regions)")
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise BadRequest(f"shared memory key {key!r} is not the name of a POSIX shm object")
        if offset < 0 or byte_size < 0:
            raise BadRequest("shared memory offset and byte_size must not be negative")
        try:
            fd = os.open(self.root / key.lstrip("/"), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as error:
            raise BadRequest(f"cannot open shared memory key '{key}': {error.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BadRequest(f"shared memory key '{key}' is not a shared memory object")
            if offset + byte_size > info.st_size:
                raise BadRequest(
                    f"shared memory region '{name}': offset {offset} and byte_size {byte_size} go past the "
                    f"{info.st_size} bytes of '{key}'"
                )
        except BaseException:
            os.close(fd)
            raise
        self.regions[name] = Region(name, key, offset, byte_size, fd)

    def unregister(self, name: str = "") -> None:
        """One region, or every region when `name` is empty; an unknown name is no error (as in Triton)."""
        for region_name in [name] if name else list(self.regions):
            region = self.regions.pop(region_name, None)
            if region is not None:
                os.close(region.fd)

    def status(self, name: str = "") -> list[dict]:
        if not name:
            return [region.status() for region in self.regions.values()]
        return [self.find(name).status()]

    def find(self, name: str) -> Region:
        region = self.regions.get(name)
        if region is None:
            raise NotFound(f"unable to find system shared memory region '{name}'")
        return region

    def close(self) -> None:
        self.unregister()


@dataclass(frozen=True)
class Slice:
    """Where a tensor lies in shared memory, as a request's parameters say."""

    region: str
    offset: int
    byte_size: int

    @classmethod
    def from_parameters(cls, parameters: dict, what: str) -> Slice | None:
        """From the `shared_memory_*` parameters (None without them); a mistake in them is a BadRequest."""
        region = parameters.get("shared_memory_region")
        size = parameters.get("shared_memory_byte_size")
        offset = parameters.get("shared_memory_offset", 0)
        if region is None and size is None:
            return None
        if not isinstance(region, str) or type(size) is not int or type(offset) is not int:
            raise BadRequest(
                f"{what}: shared memory needs a 'shared_memory_region' string and 'shared_memory_byte_size' "
                "(and optionally 'shared_memory_offset') integers"
            )
        if size < 0 or offset < 0:
            raise BadRequest(f"{what}: shared memory offset and byte size must not be negative")
        return cls(region, offset, size)
