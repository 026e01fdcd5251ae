"""Open Inference Protocol v2 inference bodies over HTTP: JSON, the binary tensor data extension, and tensors
in system shared memory.

With the binary extension, the body is a JSON header of `Inference-Header-Content-Length` bytes followed by
the tensors' raw bytes, in the order of the tensors whose parameters carry `binary_data_size`. A tensor in
shared memory is named by its `shared_memory_region`, `shared_memory_offset` and `shared_memory_byte_size`
parameters. JSON may carry NaN, Infinity and -Infinity, as Triton reads and writes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson

from edgeloop_runtime.errors import BadRequest, TooLarge
from edgeloop_runtime.model import TensorSpec
from edgeloop_runtime.protocol.tensors import (
    Signature,
    Tensor,
    decoded_cost,
    from_buffer,
    from_list,
    to_buffer,
    to_json,
    to_list,
)
from edgeloop_runtime.shared_memory import SharedMemory, Slice

NON_FINITE = (b"NaN", b"Infinity")


@dataclass(frozen=True)
class Output:
    """How a requested output is answered: in the JSON, as binary data, or in shared memory."""

    binary: bool
    shared_memory: Slice | None = None


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: dict[str, Output] | None  # None: every output, binary as `binary_default` says
    binary_default: bool  # the request-level `binary_data_output` parameter


def _parameters(obj: dict, kind: str, name: object = None) -> dict:
    parameters = obj.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' of {kind}{f' {name!r}' if name is not None else ''} must be an object")
    return parameters


def parse_json(data: memoryview) -> object:
    """orjson, and the standard library's parser only for a document with NaN or Infinity, which orjson refuses."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        text = bytes(data)
        if not any(token in text for token in NON_FINITE):
            raise BadRequest(f"malformed JSON in the request: {error}") from error
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # bad JSON, digits beyond int's limit, nesting beyond recursion's
            raise BadRequest(f"malformed JSON in the request: {error}") from error


def decode_request(
    body: bytes | bytearray,
    header_length: int | None,
    signature: Signature,
    reserve: Callable[[int], None],
    shared_memory: SharedMemory | None = None,
) -> InferRequest:
    """Decodes a request: every input's header is checked against the signature, and the memory its decoding
    takes is reserved, before any tensor data is decoded."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes")
    view = memoryview(body)
    header_end = len(body) if header_length is None else header_length
    if header_end > signature.max_json_bytes:
        raise TooLarge(
            f"the request's JSON is {header_end} bytes, more than {signature.max_json_bytes} (--max-json-bytes); "
            "send tensors with the binary tensor data extension"
        )
    header = parse_json(view[:header_end])
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise BadRequest("the request must be a JSON object with an 'inputs' list")

    offset = header_end
    planned: list[tuple[Callable, str, str, tuple[int, ...], object]] = []  # (decoder, name, datatype, shape, data)
    names: set[str] = set()
    cost = 0
    for item in header["inputs"]:
        if not isinstance(item, dict):
            raise BadRequest("each entry of 'inputs' must be an object")
        name, datatype, shape = signature.check(item.get("name"), item.get("datatype"), item.get("shape"))
        if name in names:
            raise BadRequest(f"input '{name}' is given twice")
        names.add(name)
        parameters = _parameters(item, "input", name)
        where = Slice.from_parameters(parameters, f"input '{name}'") if parameters else None
        size = parameters.get("binary_data_size")
        if (where is not None) + (size is not None) + ("data" in item) != 1:
            raise BadRequest(
                f"input '{name}' needs exactly one of 'data', a binary_data_size or shared_memory_* parameters"
            )
        if where is not None:
            planned.append((_from_region(shared_memory), name, datatype, shape, where))
            cost += where.byte_size + decoded_cost(datatype, shape, copied=False)
        elif size is None:
            planned.append((from_list, name, datatype, shape, item["data"]))
            cost += decoded_cost(datatype, shape, copied=True)
        else:
            if header_length is None:
                raise BadRequest(
                    f"input '{name}' has binary data but the request has no Inference-Header-Content-Length"
                )
            if type(size) is not int or size < 0:
                raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(body):
                raise BadRequest(
                    f"binary payload is truncated: input '{name}' needs {size} bytes at offset {offset}, "
                    f"the body has {len(body)}"
                )
            planned.append((from_buffer, name, datatype, shape, view[offset : offset + size]))
            cost += decoded_cost(datatype, shape, copied=False)
            offset += size
    if offset != len(body):
        raise BadRequest(f"{len(body) - offset} bytes after the last binary input belong to no input")
    if cost:
        reserve(cost)
    inputs = [decode(name, datatype, shape, data) for decode, name, datatype, shape, data in planned]

    parameters = _parameters(header, "the request")
    binary_default = bool(parameters.get("binary_data_output", False))
    outputs = None
    if "outputs" in header:
        if not isinstance(header["outputs"], list):
            raise BadRequest("'outputs' must be a list")
        outputs = {}
        for item in header["outputs"]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise BadRequest("each entry of 'outputs' must be an object with a 'name'")
            output_parameters = _parameters(item, "output", item["name"])
            if output_parameters.get("classification"):
                raise BadRequest("the classification extension is not supported")
            where = Slice.from_parameters(output_parameters, f"output '{item['name']}'") if output_parameters else None
            if where is not None and shared_memory is None:
                raise BadRequest("shared memory is off on this server (serve --shared-memory-dir)")
            outputs[item["name"]] = Output(bool(output_parameters.get("binary_data", binary_default)), where)
    request_id = header.get("id")
    return InferRequest(str(request_id) if request_id else None, inputs, outputs, binary_default)


def _from_region(shared_memory: SharedMemory | None) -> Callable:
    """A decoder of an input in shared memory."""
    if shared_memory is None:
        raise BadRequest("shared memory is off on this server (serve --shared-memory-dir)")

    def decode(name: str, datatype: str, shape: tuple[int, ...], where: Slice):
        data = shared_memory.find(where.region).read(where.offset, where.byte_size, f"input '{name}'")
        return from_buffer(name, datatype, shape, data)

    return decode


def encode_response(
    model: str,
    version: str,
    request: InferRequest,
    specs: dict[str, TensorSpec],
    results: dict[str, np.ndarray],
    shared_memory: SharedMemory | None = None,
) -> tuple[list[bytes], int | None]:
    """The body's parts and, when any output is binary, the JSON header's length. Outputs asked for in shared
    memory are written there, and their entries carry no data (as in Triton)."""
    wanted = request.outputs
    if wanted is None:
        wanted = dict.fromkeys(results, Output(request.binary_default))
    entries = []
    binaries = []
    for name, output in wanted.items():
        array = results[name]
        datatype = specs[name].datatype
        entry = {"name": name, "datatype": datatype, "shape": array.shape}
        if output.shared_memory is not None:
            where = output.shared_memory
            region = shared_memory.find(where.region)
            region.write(where.offset, memoryview(to_buffer(datatype, array)), where.byte_size, f"output '{name}'")
        elif output.binary:
            raw = to_buffer(datatype, array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            binaries.append(raw)
        else:
            entry["data"] = to_list(datatype, array)
        entries.append(entry)
    response = {"model_name": model, "model_version": version, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if b"null" in header:  # orjson writes a NaN or an infinity as null: write those outputs as Triton does
        for entry in entries:
            if "data" in entry:
                entry["data"] = to_json(entry["datatype"], results[entry["name"]])
        header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    return [header, *binaries], (len(header) if binaries else None)
