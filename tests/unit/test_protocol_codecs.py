"""Property tests of the runtime's protocol codecs: whatever a client sends, decoding ends in a tensor or in a
ServingError (a 4xx/INVALID_ARGUMENT naming the problem), never in another exception; what is encoded decodes
back unchanged; and the memory a request's decoding takes is reserved before anything is decoded."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import orjson
import pytest
from edgeloop_runtime.errors import BadRequest, ServingError, TooLarge, Unavailable
from edgeloop_runtime.protocol import grpc_codec, http_codec
from edgeloop_runtime.protocol import grpc_predict_v2_pb2 as pb
from edgeloop_runtime.protocol.tensors import (
    NUMPY,
    Signature,
    decoded_cost,
    deserialize_bytes,
    from_buffer,
    serialize_bytes,
    to_buffer,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


class Spec:
    def __init__(self, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        self.name, self.datatype, self.shape = name, datatype, shape


CAP = 4096
NUMERIC = sorted(set(NUMPY) - {"BYTES"})
SIGNATURE = Signature(
    "m",
    {"x": Spec("x", "FP32", (-1, 4)), "t": Spec("t", "BYTES", (-1,))},
    max_batch_size=8,
    max_elements=CAP,
    max_json_bytes=1 << 20,
)


def signature_for(datatype: str, ndim: int) -> Signature:
    return Signature("m", {"x": Spec("x", datatype, (-1,) * ndim)}, 0, max_elements=CAP, max_json_bytes=1 << 20)


def no_reservation(size: int) -> None:
    pass


# per test, not a profile: a loaded profile would change the settings of every other module's property tests
CODECS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dims = st.one_of(st.integers(-3, 10), st.integers(2**31 - 2, 2**64), st.booleans(), st.floats(), st.text(max_size=2))
shapes = st.one_of(st.lists(dims, max_size=5), st.integers(), st.none(), st.text(max_size=3))
datatypes = st.one_of(st.sampled_from([*NUMPY, "COMPLEX", "fp32", ""]), st.integers(), st.none())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=30,
)


@CODECS
@given(name=st.one_of(st.sampled_from(["x", "t", "y", ""]), st.integers()), datatype=datatypes, shape=shapes)
def test_a_header_is_accepted_only_within_the_model_and_the_caps(name, datatype, shape):
    try:
        checked_name, checked_type, checked_shape = SIGNATURE.check(name, datatype, shape)
    except ServingError:
        return
    spec = SIGNATURE.inputs[checked_name]
    assert checked_type == spec.datatype
    assert len(checked_shape) == len(spec.shape)
    assert all(want in (-1, got) for want, got in zip(spec.shape, checked_shape, strict=True))
    assert 1 <= checked_shape[0] <= 8
    assert all(0 <= d <= CAP for d in checked_shape) and math.prod(checked_shape) <= CAP


@CODECS
@given(
    st.lists(
        st.fixed_dictionaries(
            {"name": st.sampled_from(["x", "t", "z"]), "datatype": datatypes, "shape": shapes, "data": json_values},
            optional={"parameters": json_values},
        ),
        max_size=3,
    ),
    json_values,
)
def test_any_json_request_decodes_or_is_a_serving_error(inputs, outputs):
    body = json.dumps({"inputs": inputs, "outputs": outputs}).encode()
    with contextlib.suppress(ServingError):
        http_codec.decode_request(body, None, SIGNATURE, no_reservation)


@CODECS
@given(st.binary(max_size=512), st.one_of(st.none(), st.integers(-5, 600)))
def test_any_bytes_decode_or_are_a_serving_error(body, header_length):
    with contextlib.suppress(ServingError):
        http_codec.decode_request(body, header_length, SIGNATURE, no_reservation)


@CODECS
@given(st.data())
def test_a_binary_request_round_trips(data):
    datatype = data.draw(st.sampled_from(NUMERIC))
    array = data.draw(hnp.arrays(NUMPY[datatype], hnp.array_shapes(min_dims=1, max_dims=3, max_side=6)))
    raw = to_buffer(datatype, array)
    header = orjson.dumps(
        {
            "id": "r",
            "inputs": [
                {"name": "x", "datatype": datatype, "shape": array.shape, "parameters": {"binary_data_size": len(raw)}}
            ],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    request = http_codec.decode_request(header + raw, len(header), signature_for(datatype, array.ndim), no_reservation)
    (tensor,) = request.inputs
    np.testing.assert_array_equal(tensor.data, array)
    assert tensor.shape == array.shape and request.id == "r"


@CODECS
@given(st.lists(st.binary(max_size=20), max_size=30))
def test_bytes_elements_round_trip(items):
    array = np.empty(len(items), dtype=object)
    array[:] = items
    buffer = serialize_bytes(array)
    assert list(deserialize_bytes(buffer, len(items))) == items
    assert from_buffer("t", "BYTES", (len(items),), buffer).data.tolist() == items


@CODECS
@given(st.binary(max_size=200), st.integers(0, 100))
def test_any_bytes_payload_is_elements_or_a_value_error(buffer, count):
    try:
        array = deserialize_bytes(buffer, count)
    except ValueError:
        return
    assert len(array) == count and sum(4 + len(item) for item in array) == len(buffer)


@CODECS
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "name": st.sampled_from(["x", "t", "q"]),
                "datatype": st.sampled_from([*NUMPY, "NOPE"]),
                "shape": st.lists(st.integers(0, 2**63 - 1) | st.integers(0, 9), max_size=4),
            }
        ),
        max_size=3,
    ),
    st.one_of(st.none(), st.lists(st.binary(max_size=64), max_size=4)),
    st.lists(st.floats(width=32), max_size=8),
)
def test_any_grpc_request_decodes_or_is_a_serving_error(inputs, raw, fp32):
    request = pb.ModelInferRequest(model_name="m")
    for item in inputs:
        tensor = request.inputs.add(name=item["name"], datatype=item["datatype"], shape=item["shape"])
        tensor.contents.fp32_contents.extend(fp32)
    if raw is not None:
        request.raw_input_contents.extend(raw)
    with contextlib.suppress(ServingError):
        grpc_codec.decode_inputs(request, SIGNATURE, no_reservation)


def test_decoding_memory_is_reserved_before_any_decoding():
    """A BYTES input of 4096 elements: its strings' cost is asked of the budget first; refused, nothing is made."""
    asked = []

    def refuse(size: int) -> None:
        asked.append(size)
        raise Unavailable("budget full")

    data = serialize_bytes(np.array([b"a"] * 8, dtype=object))
    header = orjson.dumps(
        {"inputs": [{"name": "t", "datatype": "BYTES", "shape": [8], "parameters": {"binary_data_size": len(data)}}]}
    )
    with pytest.raises(Unavailable):
        http_codec.decode_request(header + data, len(header), SIGNATURE, refuse)
    assert asked == [decoded_cost("BYTES", (8,), copied=False)]
    json_body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [0.0] * 8}]})
    asked.clear()
    with pytest.raises(Unavailable):
        http_codec.decode_request(json_body, None, SIGNATURE, refuse)
    assert asked == [8 * 4]  # the array made from the JSON list


def test_json_beyond_its_limit_is_413_before_parsing():
    small = Signature("m", SIGNATURE.inputs, 8, max_elements=CAP, max_json_bytes=10)
    with pytest.raises(TooLarge, match="--max-json-bytes"):
        http_codec.decode_request(b'{"inputs": []}', None, small, no_reservation)


def test_a_dimension_beyond_the_cap_is_400_even_with_no_elements():
    with pytest.raises(BadRequest, match="no dimension may exceed 4096"):
        signature_for("FP32", 2).check("x", "FP32", [0, 2**62])
