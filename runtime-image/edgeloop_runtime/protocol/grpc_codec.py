"""ModelInfer messages of the KServe v2 gRPC protocol ↔ tensors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgeloop_runtime.errors import BadRequest
from edgeloop_runtime.model import TensorSpec
from edgeloop_runtime.protocol import grpc_predict_v2_pb2 as pb
from edgeloop_runtime.protocol.tensors import Signature, Tensor, decoded_cost, from_buffer, from_list, to_buffer

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


def decode_inputs(request: pb.ModelInferRequest, signature: Signature, reserve: Callable[[int], None]) -> list[Tensor]:
    """The request's tensors; every header is checked and the decoding's memory reserved before any decoding."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    headers = []
    cost = 0
    for item in request.inputs:
        name, datatype, shape = signature.check(item.name, item.datatype, list(item.shape))
        if any(name == other[0] for other in headers):
            raise BadRequest(f"input '{name}' is given twice")
        if not raw and datatype not in CONTENTS_FIELD:
            raise BadRequest(f"input '{name}' of datatype {datatype} must be sent in raw_input_contents")
        headers.append((name, datatype, shape))
        cost += decoded_cost(datatype, shape, copied=not raw)
    reserve(cost)
    if raw:
        return [from_buffer(name, datatype, shape, raw[index]) for index, (name, datatype, shape) in enumerate(headers)]
    return [
        from_list(name, datatype, shape, list(getattr(item.contents, CONTENTS_FIELD[datatype])))
        for item, (name, datatype, shape) in zip(request.inputs, headers, strict=True)
    ]


def encode_response(
    model: str,
    version: str,
    request_id: str,
    specs: dict[str, TensorSpec],
    results: dict[str, np.ndarray],
    wanted: list[str],
) -> pb.ModelInferResponse:
    """Outputs go in raw_output_contents, as Triton does and tritonclient reads."""
    names = wanted or list(results)
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name in names:
        array, datatype = results[name], specs[name].datatype
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(to_buffer(datatype, array))
    return response
