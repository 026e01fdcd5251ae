"""ModelInfer messages of the KServe v2 gRPC protocol ↔ tensors (in the messages, or in system shared memory)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgeloop_runtime.errors import BadRequest
from edgeloop_runtime.model import TensorSpec
from edgeloop_runtime.protocol import grpc_predict_v2_pb2 as pb
from edgeloop_runtime.protocol.tensors import Signature, Tensor, decoded_cost, from_buffer, from_list, to_buffer
from edgeloop_runtime.shared_memory import SharedMemory, Slice

# Which InferTensorContents field carries each datatype when a client sends typed contents.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters(entries) -> dict:
    """A map<string, InferParameter> as a dict of Python values."""
    return {
        key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in entries.items()
    }


def decode_inputs(
    request: pb.ModelInferRequest,
    signature: Signature,
    reserve: Callable[[int], None],
    shared_memory: SharedMemory | None = None,
) -> list[Tensor]:
    """The request's tensors; every header is checked and the decoding's memory reserved before any decoding.
    An input's data is in shared memory (shared_memory_* parameters), in the next of raw_input_contents (those
    hold the inputs that are not in shared memory, in order), or in typed contents."""
    raw = request.raw_input_contents
    planned = []
    cost = 0
    raw_index = 0
    for item in request.inputs:
        name, datatype, shape = signature.check(item.name, item.datatype, list(item.shape))
        if any(name == other[0] for other in planned):
            raise BadRequest(f"input '{name}' is given twice")
        where = Slice.from_parameters(parameters(item.parameters), f"input '{name}'") if item.parameters else None
        if where is not None:
            if shared_memory is None:
                raise BadRequest("shared memory is off on this server (serve --shared-memory-dir)")
            planned.append((name, datatype, shape, where))
            cost += where.byte_size + decoded_cost(datatype, shape, copied=False)
        elif raw:
            if raw_index >= len(raw):
                raise BadRequest(f"input '{name}' has no raw_input_contents: {len(raw)} for more inputs")
            planned.append((name, datatype, shape, raw[raw_index]))
            raw_index += 1
            cost += decoded_cost(datatype, shape, copied=False)
        elif datatype in CONTENTS_FIELD:
            planned.append((name, datatype, shape, getattr(item.contents, CONTENTS_FIELD[datatype])))
            cost += decoded_cost(datatype, shape, copied=True)
        else:
            raise BadRequest(f"input '{name}' of datatype {datatype} must be sent in raw_input_contents")
    if raw_index != len(raw):
        raise BadRequest(f"{len(raw) - raw_index} raw_input_contents belong to no input")
    if cost:
        reserve(cost)
    tensors = []
    for name, datatype, shape, data in planned:
        if isinstance(data, Slice):
            data = shared_memory.find(data.region).read(data.offset, data.byte_size, f"input '{name}'")
        if isinstance(data, bytes | np.ndarray):
            tensors.append(from_buffer(name, datatype, shape, data))
        else:
            tensors.append(from_list(name, datatype, shape, list(data)))
    return tensors


def requested_outputs(request: pb.ModelInferRequest, shared_memory: SharedMemory | None) -> dict[str, Slice | None]:
    """The outputs asked for (all when none is), each with where in shared memory it goes, if anywhere."""
    wanted = {}
    for output in request.outputs:
        where = (
            Slice.from_parameters(parameters(output.parameters), f"output '{output.name}'")
            if output.parameters
            else None
        )
        if where is not None and shared_memory is None:
            raise BadRequest("shared memory is off on this server (serve --shared-memory-dir)")
        wanted[output.name] = where
    return wanted


def encode_response(
    model: str,
    version: str,
    request_id: str,
    specs: dict[str, TensorSpec],
    results: dict[str, np.ndarray],
    wanted: dict[str, Slice | None],
    shared_memory: SharedMemory | None = None,
) -> pb.ModelInferResponse:
    """Outputs go in raw_output_contents, as Triton does and tritonclient reads; one asked for in shared memory is
    written there, and its raw_output_contents entry is empty (so that the others keep their places)."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, where in (wanted or dict.fromkeys(results)).items():
        array, datatype = results[name], specs[name].datatype
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        raw = to_buffer(datatype, array)
        if where is not None:
            shared_memory.find(where.region).write(where.offset, memoryview(raw), where.byte_size, f"output '{name}'")
            raw = b""
        response.raw_output_contents.append(raw)
    return response
