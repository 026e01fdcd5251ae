"""Writes a multilayer perceptron as a .tflite file with LiteRT's own flatbuffer schema, without TensorFlow.

For tests and the bench (the same weights as an ONNX MLP), and a small example of the format:
input FP32 [N, features] → fully connected layers (ReLU between them) → logits FP32 [N, classes] (or, with
softmax, probabilities) and label INT64 [N] (the arg max). The batch dimension is dynamic (shape signature -1).
"""

from __future__ import annotations

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

TYPES = {np.dtype(np.float32): schema.TensorType.FLOAT32, np.dtype(np.int32): schema.TensorType.INT32,
         np.dtype(np.int64): schema.TensorType.INT64}  # fmt: skip


def mlp(layers: list[tuple[np.ndarray, np.ndarray]], input_name: str = "input", softmax: bool = False) -> bytes:
    """`layers`: (weight [in, out], bias [out]) per layer, as an ONNX MatMul + Add holds them."""
    buffers = [schema.BufferT()]  # buffer 0 is the empty one, by convention
    tensors: list[schema.TensorT] = []
    codes: list[int] = []
    operators: list[schema.OperatorT] = []

    def tensor(name: str, shape: list[int], dtype, data: np.ndarray | None = None) -> int:
        buffer = 0
        if data is not None:
            buffers.append(schema.BufferT())
            buffers[-1].data = np.frombuffer(np.ascontiguousarray(data, dtype=dtype).tobytes(), np.uint8)
            buffer = len(buffers) - 1
        item = schema.TensorT()
        item.name, item.type, item.buffer = name, TYPES[np.dtype(dtype)], buffer
        item.shape = [1 if d < 0 else d for d in shape]
        item.shapeSignature = list(shape) if data is None else None
        tensors.append(item)
        return len(tensors) - 1

    def operator(code: int, inputs: list[int], outputs: list[int], options_type: int, options) -> None:
        if code not in codes:
            codes.append(code)
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = codes.index(code), inputs, outputs
        op.builtinOptionsType, op.builtinOptions = options_type, options
        operators.append(op)

    current = tensor(input_name, [-1, layers[0][0].shape[0]], np.float32)
    for number, (weight, bias) in enumerate(layers):
        last = number == len(layers) - 1
        w = tensor(f"w{number}", list(weight.T.shape), np.float32, weight.T)  # TFLite keeps [out, in]
        b = tensor(f"b{number}", list(bias.shape), np.float32, bias)
        out = tensor("logits" if last else f"h{number}", [-1, weight.shape[1]], np.float32)
        options = schema.FullyConnectedOptionsT()
        options.fusedActivationFunction = (
            schema.ActivationFunctionType.NONE if last else schema.ActivationFunctionType.RELU
        )
        operator(schema.BuiltinOperator.FULLY_CONNECTED, [current, w, b], [out],
                 schema.BuiltinOptions.FullyConnectedOptions, options)  # fmt: skip
        current = out
    if softmax:
        probabilities = tensor("probabilities", [-1, layers[-1][0].shape[1]], np.float32)
        options = schema.SoftmaxOptionsT()
        options.beta = 1.0
        operator(schema.BuiltinOperator.SOFTMAX, [current], [probabilities], schema.BuiltinOptions.SoftmaxOptions,
                 options)  # fmt: skip
        current = probabilities
    axis = tensor("axis", [1], np.int32, np.array([1], np.int32))
    label = tensor("label", [-1], np.int64)
    options = schema.ArgMaxOptionsT()
    options.outputType = schema.TensorType.INT64
    operator(schema.BuiltinOperator.ARG_MAX, [current, axis], [label], schema.BuiltinOptions.ArgMaxOptions, options)

    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0], [current, label], operators
    graph.name = "main"
    model = schema.ModelT()
    model.version, model.description, model.subgraphs, model.buffers = 3, "edgeloop MLP", [graph], buffers
    model.operatorCodes = []
    for code in codes:
        entry = schema.OperatorCodeT()
        entry.builtinCode, entry.deprecatedBuiltinCode, entry.version = code, min(code, 127), 1
        model.operatorCodes.append(entry)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
