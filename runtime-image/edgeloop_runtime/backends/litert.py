"""LiteRT (TensorFlow Lite): format `tflite`, with ai-edge-litert's Interpreter and no TensorFlow.

The CPU is the floor (LiteRT applies its XNNPACK delegate by default) and, for now, the only device: it is
named CPUExecutionProvider, as ONNX Runtime names it, so that an accelerator class's providers mean the same
for both formats, and a tflite model on an accelerator class is refused, or served on CPU with
--allow-cpu-fallback, like an ONNX model whose provider is missing.
An Interpreter is not thread-safe: each instance has interpreters of its own, one per batch shape it runs.
"""

from __future__ import annotations

import queue
from collections import OrderedDict

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from edgeloop_runtime.backends import CPU, KIND_CPU, LoadOptions, ModelLoadError, TensorSpec, resolve_providers

SHAPES_PER_INSTANCE = 16  # interpreters an instance keeps, one per set of input shapes

# numpy dtype of a LiteRT tensor → OIP datatype (quantized tensors are served as their integers).
FROM_LITERT: dict[np.dtype, str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}


def tensor_spec(detail: dict, batch_dynamic: bool) -> TensorSpec:
    dtype = np.dtype(detail["dtype"])
    if dtype not in FROM_LITERT:
        raise ModelLoadError(f"{detail['name']!r} has type {dtype}, which edgeloop does not serve for tflite models")
    signature = detail.get("shape_signature")
    shape = [int(d) for d in (signature if signature is not None and len(signature) else detail["shape"])]
    if batch_dynamic and shape:
        shape[0] = -1
    return TensorSpec(detail["name"], FROM_LITERT[dtype], tuple(shape))


def resizes_on_batch(interpreter: Interpreter) -> bool:
    """Whether every input and output follows the first dimension of the inputs: the model batches when its
    inputs resized to 2 along it give outputs of 2 along it (checked on a scratch interpreter)."""
    inputs = interpreter.get_input_details()
    if not all(len(d["shape"]) and (d["shape_signature"][0] == -1 or d["shape"][0] == 1) for d in inputs):
        return False
    try:
        for detail in inputs:
            interpreter.resize_tensor_input(detail["index"], [2, *detail["shape"][1:]], strict=False)
        interpreter.allocate_tensors()
    except (RuntimeError, ValueError):
        return False
    return all(len(d["shape"]) and d["shape"][0] == 2 for d in interpreter.get_output_details())


class Prepared:
    """An interpreter allocated for one set of input shapes."""

    def __init__(self, interpreter: Interpreter) -> None:
        self.interpreter = interpreter
        self.inputs = {d["name"]: d["index"] for d in interpreter.get_input_details()}
        self.outputs = [d["index"] for d in interpreter.get_output_details()]

    def resize(self, feeds: dict[str, np.ndarray]) -> Prepared:
        for name, array in feeds.items():
            self.interpreter.resize_tensor_input(self.inputs[name], list(array.shape), strict=False)
        self.interpreter.allocate_tensors()
        return self

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name, array in feeds.items():
            self.interpreter.set_tensor(self.inputs[name], array)
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(index) for index in self.outputs]


class Instance:
    """One instance: an interpreter per set of input shapes it has run (a batching model runs at a few allowed
    batch sizes: resizing re-prepares XNNPACK at each change), at most SHAPES_PER_INSTANCE of them; beyond, the
    least recently used one is resized."""

    def __init__(self, data: bytes, threads: int) -> None:
        self.data, self.threads = data, threads
        self.prepared: OrderedDict[tuple, Prepared] = OrderedDict()

    def interpreter(self) -> Interpreter:
        interpreter = Interpreter(model_content=self.data, num_threads=self.threads if self.threads > 0 else None)
        interpreter.allocate_tensors()
        return interpreter

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        key = tuple(array.shape for array in feeds.values())
        prepared = self.prepared.get(key)
        if prepared is not None:
            self.prepared.move_to_end(key)
        else:
            if len(self.prepared) >= SHAPES_PER_INSTANCE:
                prepared = self.prepared.popitem(last=False)[1].resize(feeds)
            else:
                prepared = Prepared(self.interpreter()).resize(feeds)
            self.prepared[key] = prepared
        return prepared.run(feeds)


class LiteRTSession:
    def __init__(self, data: bytes, options: LoadOptions, providers: list[str]) -> None:
        self._data, self._threads = data, options.threads
        first = Instance(data, options.threads)
        interpreter = first.interpreter()
        batch_dynamic = resizes_on_batch(first.interpreter())
        self.inputs = [tensor_spec(d, batch_dynamic) for d in interpreter.get_input_details()]
        self.outputs = [tensor_spec(d, batch_dynamic) for d in interpreter.get_output_details()]
        self.providers = providers
        self.device_kind = KIND_CPU
        self._count = 1
        self._free: queue.SimpleQueue[Instance] = queue.SimpleQueue()
        self._free.put(first)

    def set_instances(self, count: int) -> None:
        for _ in range(count - self._count):
            self._free.put(Instance(self._data, self._threads))
        self._count = max(self._count, count)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        instance = self._free.get()
        try:
            return instance.run(feeds)
        finally:
            self._free.put(instance)

    def strings(self, name: str, array: np.ndarray) -> np.ndarray:
        return array  # no string tensors are served (tensor_spec refuses them)


class LiteRT:
    name = "litert"
    platform = "litert_tflite"

    def available_providers(self) -> list[str]:
        return [CPU]

    def load(self, data: bytes, options: LoadOptions) -> LiteRTSession:
        providers = resolve_providers(options.providers, self.available_providers(), options.allow_cpu_fallback)
        given = [p for p in providers if options.provider_options.get(p)]
        if given:
            raise ModelLoadError(f"LiteRT takes no provider options (given for {given})")
        try:
            return LiteRTSession(data, options, providers)
        except (
            ValueError,
            RuntimeError,
        ) as error:  # LiteRT's error for a file it cannot read or a model it cannot prepare
            raise ModelLoadError(f"LiteRT could not load the model: {error}") from error


BACKEND = LiteRT()
