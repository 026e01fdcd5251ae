"""Open Inference Protocol v2 inference bodies over HTTP: JSON, and the binary tensor data extension.

With the extension, the body is a JSON header of `Inference-Header-Content-Length` bytes followed by
the tensors' raw bytes, in the order of the tensors whose parameters carry `binary_data_size`.
"""

from __future__ import annotations

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
    to_list,
)


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: dict[str, bool] | None  # requested output → binary; None: every output
    binary_default: bool  # the request-level `binary_data_output` parameter


def _parameters(obj: dict, where: str) -> dict:
    parameters = obj.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' of {where} must be an object")
    return parameters


def decode_request(
    body: bytes, header_length: int | None, signature: Signature, reserve: Callable[[int], None]
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
    try:
        header = orjson.loads(view[:header_end])
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"malformed JSON in the request: {error}") from error
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise BadRequest("the request must be a JSON object with an 'inputs' list")

    offset = header_end
    planned: list[tuple[str, str, tuple[int, ...], memoryview | None, object]] = []
    cost = 0
    for item in header["inputs"]:
        if not isinstance(item, dict):
            raise BadRequest("each entry of 'inputs' must be an object")
        name, datatype, shape = signature.check(item.get("name"), item.get("datatype"), item.get("shape"))
        if any(name == other[0] for other in planned):
            raise BadRequest(f"input '{name}' is given twice")
        size = _parameters(item, f"input '{name}'").get("binary_data_size")
        if size is None:
            if "data" not in item:
                raise BadRequest(f"input '{name}' has neither 'data' nor a binary_data_size parameter")
            planned.append((name, datatype, shape, None, item["data"]))
            cost += decoded_cost(datatype, shape, copied=True)
            continue
        if header_length is None:
            raise BadRequest(f"input '{name}' has binary data but the request has no Inference-Header-Content-Length")
        if type(size) is not int or size < 0:
            raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
        if offset + size > len(body):
            raise BadRequest(
                f"binary payload is truncated: input '{name}' needs {size} bytes at offset {offset}, "
                f"the body has {len(body)}"
            )
        planned.append((name, datatype, shape, view[offset : offset + size], None))
        cost += decoded_cost(datatype, shape, copied=False)
        offset += size
    if offset != len(body):
        raise BadRequest(f"{len(body) - offset} bytes after the last binary input belong to no input")
    reserve(cost)
    inputs = [
        from_list(name, datatype, shape, data) if buffer is None else from_buffer(name, datatype, shape, buffer)
        for name, datatype, shape, buffer, data in planned
    ]

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
            output_parameters = _parameters(item, f"output '{item['name']}'")
            if output_parameters.get("classification"):
                raise BadRequest("the classification extension is not supported")
            outputs[item["name"]] = bool(output_parameters.get("binary_data", binary_default))
    request_id = header.get("id")
    return InferRequest(str(request_id) if request_id is not None else None, inputs, outputs, binary_default)


def encode_response(
    model: str,
    version: str,
    request: InferRequest,
    specs: dict[str, TensorSpec],
    results: dict[str, np.ndarray],
) -> tuple[list[bytes], int | None]:
    """The body's parts and, when any output is binary, the JSON header's length."""
    wanted = request.outputs if request.outputs is not None else dict.fromkeys(results, request.binary_default)
    entries = []
    binaries = []
    for name, binary in wanted.items():
        array = results[name]
        datatype = specs[name].datatype
        entry = {"name": name, "datatype": datatype, "shape": array.shape}
        if binary:
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
    return [header, *binaries], (len(header) if binaries else None)
