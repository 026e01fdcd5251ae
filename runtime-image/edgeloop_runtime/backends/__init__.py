"""Inference backends: the one seam between the server and an inference library.

A backend turns a model file's bytes into a Session: its input and output specs in the Open Inference
Protocol's datatypes, `run`, and what it really runs on (providers in use, device kind). The model, the
batcher and the protocol layers see only this. Backends are found by model format and imported only when
asked for, so an image flavour never imports a library it does not ship.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

# Model format (InferenceModel spec.model.format, `serve --format`) → the module whose BACKEND serves it.
FORMATS: dict[str, str] = {
    "onnx": "edgeloop_runtime.backends.onnxruntime",
    "tflite": "edgeloop_runtime.backends.litert",
}
# What a flavour must install to serve a format (for the error when it is missing).
PACKAGES = {"onnx": "onnxruntime (or onnxruntime-gpu / onnxruntime-openvino)", "tflite": "ai-edge-litert"}

CPU = "CPUExecutionProvider"  # the floor every backend offers, named as ONNX Runtime names it
KIND_CPU, KIND_GPU = "KIND_CPU", "KIND_GPU"  # Triton's instance_group kinds


class ModelLoadError(Exception):
    """The model cannot be served as asked: the message says why, for the log and the pod's status."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # OIP datatype
    shape: tuple[int, ...]  # -1 marks a dynamic dimension

    def as_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class LoadOptions:
    providers: list[str] = field(default_factory=lambda: [CPU])  # requested, in order of preference
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    allow_cpu_fallback: bool = False
    threads: int = 1  # intra-op threads per run; 0: the library decides
    compiled_cache: Path | None = None  # this model's directory for compiled artefacts, when given


class Session(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    providers: list[str]  # the providers (or delegates) really in use, best first
    device_kind: str  # KIND_CPU or KIND_GPU

    def set_instances(self, count: int) -> None:
        """Makes `run` safe to call from `count` threads at once (one instance each)."""

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs in the order of `outputs`."""

    def strings(self, name: str, array: np.ndarray) -> np.ndarray:
        """A BYTES input (an object array of bytes) as the library takes strings; BadRequest when it cannot."""


class Backend(Protocol):
    name: str  # Triton's `backend` in the model configuration
    platform: str  # the Open Inference Protocol's / Triton's `platform`

    def available_providers(self) -> list[str]: ...

    def load(self, data: bytes, options: LoadOptions) -> Session: ...


def backend_for(model_format: str) -> Backend:
    """The backend of a model format, imported now; ModelLoadError when this image does not ship it."""
    try:
        module_name = FORMATS[model_format]
    except KeyError:
        raise ModelLoadError(f"unknown model format {model_format!r}; known: {sorted(FORMATS)}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(
            f"this runtime image cannot serve {model_format} models: {error} "
            f"(the image needs {PACKAGES[model_format]}; use the runtime image that ships it)"
        ) from error
    return module.BACKEND


def check_in_use(requested: list[str], in_use: list[str], allow_cpu_fallback: bool) -> None:
    """Refuses a session that runs on fewer providers than requested (a provider that failed to initialise,
    or OpenVINO's silent drop to CPU for a device it cannot open), unless CPU fallback is allowed."""
    dropped = [p for p in requested if p not in in_use]
    if dropped and not allow_cpu_fallback:
        raise ModelLoadError(
            f"execution providers {dropped} failed to initialise (in use: {in_use}); "
            "pass --allow-cpu-fallback to serve on what remains"
        )


def resolve_providers(requested: list[str], available: list[str], allow_cpu_fallback: bool) -> list[str]:
    """The providers to hand the library, in the requested order.

    A requested provider this build lacks is an error, unless CPU fallback is allowed, in which case it is
    skipped and CPU is appended.
    """
    missing = [p for p in requested if p not in available]
    if missing and not allow_cpu_fallback:
        raise ModelLoadError(
            f"execution providers {missing} are not available (available: {available}); "
            "pass --allow-cpu-fallback to serve on CPU instead"
        )
    chosen = [p for p in requested if p in available]
    if allow_cpu_fallback and CPU not in chosen:
        chosen.append(CPU)
    if not chosen:
        raise ModelLoadError("no execution provider to run the model with")
    return chosen
