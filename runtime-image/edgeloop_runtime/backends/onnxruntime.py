"""ONNX Runtime: everything the runtime knows about it is here (format `onnx`).

The same module serves every flavour of the wheel (onnxruntime, onnxruntime-gpu, onnxruntime-openvino): they
all install the `onnxruntime` package and differ in the execution providers they offer.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeloop_runtime.backends import (
    CPU,
    KIND_CPU,
    KIND_GPU,
    LoadOptions,
    ModelLoadError,
    TensorSpec,
    check_in_use,
    resolve_providers,
)
from edgeloop_runtime.errors import BadRequest

log = logging.getLogger(__name__)

# ONNX Runtime's type strings (NodeArg.type) → OIP datatype.
FROM_ORT: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
GPU_PROVIDERS = {
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "DmlExecutionProvider",
}
OPENVINO = "OpenVINOExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
NVIDIA = {"CUDAExecutionProvider", TENSORRT}
# ONNX Runtime's error when the nodes it could not give an accelerator would have to run on the CPU.
CPU_FALLBACK_DISABLED = "fallback to CPU EP has been explicitly disabled"


def load_nvidia_libraries() -> None:
    """Load CUDA's and cuDNN's libraries from their PyPI wheels (the cuda image's site-packages/nvidia), which
    are on no library path: without this the CUDA provider fails to load (libcublasLt.so.13 not found) even on
    a GPU. The driver is the node's, mounted by the nvidia container runtime."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None:
        preload(cuda=True, cudnn=True, msvc=False, directory="")


def unavailable_accelerators(providers: list[str], error: Exception) -> ModelLoadError:
    """Why a session with CPU fallback off could not be made: the accelerators failed to initialise."""
    hint = ""
    if NVIDIA & set(providers) and not any(Path("/dev").glob("nvidia[0-9]*")):
        hint = (
            " no NVIDIA device in this container (/dev/nvidia*): is the node's GPU advertised and the pod's"
            " runtimeClassName nvidia?"
        )
    return ModelLoadError(
        f"execution providers {providers} failed to initialise on this node (ONNX Runtime's log above says why):"
        f"{hint} pass --allow-cpu-fallback to serve on CPU instead. ONNX Runtime: {error}"
    )


def tensor_spec(node: ort.NodeArg) -> TensorSpec:
    if node.type not in FROM_ORT:
        raise ModelLoadError(
            f"{node.name!r} has type {node.type}, which the Open Inference Protocol cannot carry "
            "(export classifiers without ZipMap, e.g. skl2onnx options={'zipmap': False})"
        )
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape)
    return TensorSpec(node.name, FROM_ORT[node.type], shape)


def provider_options(providers: list[str], options: LoadOptions) -> list[dict[str, str]]:
    """Each provider's options, with the compiled-artefact caches put under --compiled-cache unless set."""
    result = []
    for provider in providers:
        chosen = dict(options.provider_options.get(provider, {}))
        if options.compiled_cache is not None:
            if provider == OPENVINO:
                chosen.setdefault("cache_dir", str(options.compiled_cache / "openvino"))
            elif provider == TENSORRT:
                chosen.setdefault("trt_engine_cache_enable", "True")
                chosen.setdefault("trt_engine_cache_path", str(options.compiled_cache / "tensorrt"))
        result.append(chosen)
    return result


def device_kind(in_use: list[str], options: LoadOptions) -> str:
    """Triton's instance_group kind of what runs the model's first nodes."""
    first = in_use[0]
    if first in GPU_PROVIDERS:
        return KIND_GPU
    if first == OPENVINO:
        device = options.provider_options.get(OPENVINO, {}).get("device_type", "CPU")
        return KIND_CPU if device.upper().startswith("CPU") else KIND_GPU
    return KIND_CPU


class OnnxSession:
    def __init__(self, create: Callable[[], ort.InferenceSession], threads: int, options: LoadOptions) -> None:
        self._create = create
        first = create()
        self.inputs = [tensor_spec(n) for n in first.get_inputs()]
        self.outputs = [tensor_spec(n) for n in first.get_outputs()]
        self.providers: list[str] = first.get_providers()
        self.device_kind = device_kind(self.providers, options)
        # With one intra-op thread a run computes on its caller's thread, so instances share one session (one
        # copy of the weights); with more, each instance gets a session of its own, as Triton's instances do,
        # so that concurrent runs do not contend for one intra-op pool.
        self._shared = first if threads == 1 else None
        if self._shared is not None:
            self._create = None  # the model's bytes are not needed again
        self._count = 1
        self._free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        self._free.put(first)

    def set_instances(self, count: int) -> None:
        if self._shared is not None:
            return
        for _ in range(count - self._count):
            self._free.put(self._create())
        self._count = max(self._count, count)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._shared is not None:  # ONNX Runtime allows concurrent runs of one session
            return self._shared.run(None, feeds)
        session = self._free.get()
        try:
            return session.run(None, feeds)
        finally:
            self._free.put(session)

    def strings(self, name: str, array: np.ndarray) -> np.ndarray:
        """OIP BYTES elements are bytes; ONNX Runtime's string tensors take str (UTF-8 text)."""
        try:
            text = [v.decode() if isinstance(v, bytes) else str(v) for v in array.ravel()]
        except UnicodeDecodeError as error:
            raise BadRequest(f"input '{name}' is not UTF-8 text, which ONNX strings must be: {error}") from None
        return np.array(text, dtype=object).reshape(array.shape)


class OnnxRuntime:
    name = "onnxruntime"
    platform = "onnxruntime_onnx"

    def available_providers(self) -> list[str]:
        return ort.get_available_providers()

    def load(self, data: bytes, options: LoadOptions) -> OnnxSession:
        providers = resolve_providers(options.providers, self.available_providers(), options.allow_cpu_fallback)
        settings = ort.SessionOptions()
        settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        settings.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        settings.inter_op_num_threads = 1
        if options.threads > 0:
            settings.intra_op_num_threads = options.threads
        if CPU not in providers:
            # Without this, ONNX Runtime quietly runs the nodes an accelerator cannot take on CPU.
            settings.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if NVIDIA & set(providers):
            load_nvidia_libraries()
        if options.compiled_cache is not None:
            options.compiled_cache.mkdir(parents=True, exist_ok=True)
        chosen_options = provider_options(providers, options)

        def create() -> ort.InferenceSession:
            try:
                session = ort.InferenceSession(
                    data, sess_options=settings, providers=providers, provider_options=chosen_options
                )
            except Exception as error:  # ONNX Runtime raises its own exception types per failure
                if CPU_FALLBACK_DISABLED in str(error):
                    raise unavailable_accelerators(providers, error) from error
                raise ModelLoadError(f"ONNX Runtime could not load the model: {error}") from error
            # A provider that fails to initialise (no driver, no device) is dropped silently by ONNX Runtime;
            # so is OpenVINO asked for a device it cannot open (it logs an error and leaves CPU).
            check_in_use(providers, session.get_providers(), options.allow_cpu_fallback)
            return session

        return OnnxSession(create, options.threads, options)


BACKEND = OnnxRuntime()
