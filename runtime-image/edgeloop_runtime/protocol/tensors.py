"""Tensors on the wire: datatype tables (OIP, numpy, Triton config) and the codecs of one tensor.

Decoders raise BadRequest naming the tensor, since their input is whatever a client sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import orjson

from edgeloop_runtime.errors import BadRequest, TooLarge


@dataclass(frozen=True)
class Tensor:
    """One decoded input: what the client declared, and the data as numpy."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


# OIP datatype → numpy dtype, little-endian as the binary extension requires. BYTES is variable length.
NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# OIP datatype → Triton's model_config DataType enum name (BYTES is TYPE_STRING there).
TRITON_CONFIG: dict[str, str] = {name: f"TYPE_{'STRING' if name == 'BYTES' else name}" for name in NUMPY}


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES elements as the binary extension lays them out: a 4-byte little-endian length, then the bytes."""
    parts = []
    for item in array.ravel(order="C"):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(len(data).to_bytes(4, "little"))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, count: int) -> np.ndarray:
    """The inverse of serialize_bytes; raises ValueError when the buffer does not hold exactly `count` items."""
    items = []
    offset = 0
    view = memoryview(buffer)
    while offset < len(view):
        if offset + 4 > len(view):
            raise ValueError("BYTES element length prefix is truncated")
        size = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(view):
            raise ValueError("BYTES element is truncated")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    if len(items) != count:
        raise ValueError(f"BYTES payload holds {len(items)} elements, the shape needs {count}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


# What a BYTES element costs in memory once decoded (Python objects: bytes, str, array slots), beyond its data.
BYTES_ELEMENT_COST = 128


@dataclass(frozen=True)
class Signature:
    """What a request's inputs are checked against before any of their data is decoded: the model's inputs
    (anything with a name, an OIP datatype and a shape in which -1 is any size), its batch limit, and limits."""

    model: str
    inputs: Mapping[str, object]
    max_batch_size: int  # 0: no batch dimension
    max_elements: int  # per tensor, and per dimension
    max_json_bytes: int

    def check(self, name: object, datatype: object, shape: object) -> tuple[str, str, tuple[int, ...]]:
        """The input's header, checked; BadRequest names what is wrong, TooLarge when it holds too many elements."""
        if not isinstance(name, str) or not name:
            raise BadRequest("every input needs a 'name' string")
        spec = self.inputs.get(name)
        if spec is None:
            raise BadRequest(f"unexpected input '{name}': model '{self.model}' has inputs {list(self.inputs)}")
        if datatype not in NUMPY:
            raise BadRequest(f"input '{name}' has unknown datatype {datatype!r}; known: {sorted(NUMPY)}")
        if datatype != spec.datatype:
            raise BadRequest(f"input '{name}' has datatype {datatype}, the model expects {spec.datatype}")
        if not isinstance(shape, list | tuple):
            raise BadRequest(f"input '{name}' needs a 'shape' of non-negative integers, got {shape!r}")
        want = spec.shape
        fits = len(shape) == len(want)
        count = 1
        for index, dim in enumerate(shape):  # one pass: this runs for every input of every request
            if type(dim) is not int or dim < 0:
                raise BadRequest(f"input '{name}' needs a 'shape' of non-negative integers, got {shape!r}")
            if dim > self.max_elements:
                raise BadRequest(
                    f"input '{name}' has shape {list(shape)}: no dimension may exceed {self.max_elements} "
                    "(--max-tensor-elements)"
                )
            if fits and want[index] != -1 and want[index] != dim:
                fits = False
            count *= dim
        if not fits:
            raise BadRequest(f"input '{name}' has shape {list(shape)}, the model expects {list(want)} (-1: any size)")
        shape = tuple(shape)
        if self.max_batch_size and not 1 <= shape[0] <= self.max_batch_size:
            raise BadRequest(f"batch size {shape[0]} is outside 1..{self.max_batch_size} (--max-batch-size)")
        if count > self.max_elements:
            raise TooLarge(
                f"input '{name}' has {count} elements, more than {self.max_elements} (--max-tensor-elements)"
            )
        return name, datatype, shape


def decoded_cost(datatype: str, shape: tuple[int, ...], copied: bool) -> int:
    """Memory a tensor's decoding allocates beyond the request's body: nothing for raw numeric data (a view),
    the array for data decoded from a list, and the Python objects of BYTES elements."""
    if datatype == "BYTES":
        return math.prod(shape) * BYTES_ELEMENT_COST
    return math.prod(shape) * NUMPY[datatype].itemsize if copied else 0


def from_buffer(name: str, datatype: str, shape: tuple[int, ...], buffer: bytes | memoryview) -> Tensor:
    """A tensor from the binary extension's (or gRPC raw_input_contents') little-endian bytes."""
    count = math.prod(shape)
    if datatype == "BYTES":
        try:
            array = deserialize_bytes(buffer, count)
        except ValueError as error:
            raise BadRequest(f"input '{name}': {error}") from error
        return Tensor(name, datatype, shape, array.reshape(shape))
    dtype = NUMPY[datatype]
    if len(buffer) != count * dtype.itemsize:
        raise BadRequest(
            f"input '{name}' has {len(buffer)} bytes of data, shape {list(shape)} of {datatype} needs "
            f"{count * dtype.itemsize}"
        )
    return Tensor(name, datatype, shape, np.frombuffer(buffer, dtype=dtype).reshape(shape))


def from_list(name: str, datatype: str, shape: tuple[int, ...], data: object) -> Tensor:
    """A tensor from JSON data, flat or nested in row-major order."""
    try:
        if datatype == "BYTES":
            array = np.array(
                [v.encode() if isinstance(v, str) else bytes(v) for v in np.array(data, dtype=object).ravel()],
                dtype=object,
            )
        else:
            array = np.array(data, dtype=NUMPY[datatype]).ravel()
    except (ValueError, TypeError, OverflowError) as error:
        raise BadRequest(f"input '{name}': data is not a list of {datatype} values ({error})") from error
    if array.size != math.prod(shape):
        raise BadRequest(f"input '{name}' has {array.size} values, shape {list(shape)} needs {math.prod(shape)}")
    return Tensor(name, datatype, shape, array.reshape(shape))


def to_buffer(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=NUMPY[datatype]).tobytes()


def to_list(datatype: str, array: np.ndarray) -> object:
    """Flat row-major JSON data: a contiguous numpy array (orjson writes it natively) or a list of str."""
    if datatype == "BYTES":
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    return np.ascontiguousarray(array).ravel()


def to_json(datatype: str, array: np.ndarray) -> object:
    """to_list, with floats that are not all finite written as Triton writes them (NaN, Infinity, -Infinity),
    where orjson would write null."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return orjson.Fragment(json.dumps(array.ravel().tolist()))
    return to_list(datatype, array)
