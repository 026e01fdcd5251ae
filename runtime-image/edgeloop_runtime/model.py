"""Loading an ONNX model into ONNX Runtime, and checking requests against its signature."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeloop_runtime.errors import BadRequest
from edgeloop_runtime.protocol.tensors import FROM_ORT, NUMPY, Tensor

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


class ModelLoadError(Exception):
    pass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # OIP datatype
    shape: tuple[int, ...]  # -1 marks a dynamic dimension

    @classmethod
    def from_node(cls, node: ort.NodeArg) -> TensorSpec:
        if node.type not in FROM_ORT:
            raise ModelLoadError(
                f"{node.name!r} has type {node.type}, which the Open Inference Protocol cannot carry "
                "(export classifiers without ZipMap, e.g. skl2onnx options={'zipmap': False})"
            )
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape)
        return cls(node.name, FROM_ORT[node.type], shape)

    def as_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolve_providers(requested: list[str], available: list[str], allow_cpu_fallback: bool) -> list[str]:
    """The providers to hand ONNX Runtime, in the requested order.

    A requested provider this build of ONNX Runtime lacks is an error, unless CPU fallback is allowed,
    in which case it is skipped and CPU is appended.
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


def create_session(
    model_bytes: bytes, providers: list[str], allow_cpu_fallback: bool, threads: int
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads > 0:
        options.intra_op_num_threads = threads
    if CPU not in providers:
        # Without this, ONNX Runtime quietly runs the nodes an accelerator cannot take on CPU.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
    except Exception as error:  # ONNX Runtime raises its own exception types per failure
        raise ModelLoadError(f"ONNX Runtime could not load the model: {error}") from error
    in_use = session.get_providers()
    # A provider that fails to initialise (no driver, no device) is dropped silently by ONNX Runtime.
    dropped = [p for p in providers if p not in in_use]
    if dropped and not allow_cpu_fallback:
        raise ModelLoadError(f"execution providers {dropped} failed to initialise; in use: {in_use}")
    return session


def read_verified(path: Path, expected_sha256: str | None) -> tuple[bytes, str]:
    """The model's bytes and digest; the same bytes that were hashed are the ones loaded."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelLoadError(f"cannot read model {path}: {error}") from error
    digest = sha256_hex(data)
    if expected_sha256 and digest != expected_sha256.lower():
        raise ModelLoadError(f"refusing {path}: its sha256 is {digest}, expected {expected_sha256.lower()}")
    return data, digest


class Model:
    """An ONNX Runtime session with the metadata the protocol reports about it."""

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        name: str,
        version: str,
        sha256: str,
        max_batch_size: int,
    ) -> None:
        self.session = session
        self.name = name
        self.version = version
        self.sha256 = sha256
        self.providers: list[str] = session.get_providers()
        self.inputs = {n.name: TensorSpec.from_node(n) for n in session.get_inputs()}
        self.outputs = {n.name: TensorSpec.from_node(n) for n in session.get_outputs()}
        specs = [*self.inputs.values(), *self.outputs.values()]
        has_batch_dim = all(spec.shape and spec.shape[0] == -1 for spec in specs)
        # Triton's convention: max_batch_size 0 means the model takes whole tensors, unbatched.
        self.max_batch_size = max_batch_size if has_batch_dim else 0
        if max_batch_size > 0 and not has_batch_dim:
            log.info("model %s has no dynamic first dimension on every tensor: dynamic batching is off", name)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(None, feeds)
        return dict(zip(self.outputs, results, strict=True))

    def warm_up(self) -> None:
        """Runs once on zeros so that the first request does not pay for lazy initialisation."""
        feeds = {
            spec.name: np.zeros([d if d >= 0 else 1 for d in spec.shape], dtype=NUMPY[spec.datatype])
            for spec in self.inputs.values()
            if spec.datatype != "BYTES"
        }
        if len(feeds) == len(self.inputs):
            try:
                self.run(feeds)
            except Exception as error:  # a model may reject zeros; serving does not depend on this
                log.warning("warm-up inference failed (serving anyway): %s", error)

    def check(self, tensors: list[Tensor]) -> tuple[dict[str, np.ndarray], int]:
        """The feeds for ONNX Runtime and the request's batch size; BadRequest names what is wrong."""
        feeds: dict[str, np.ndarray] = {}
        for tensor in tensors:
            spec = self.inputs.get(tensor.name)
            if spec is None:
                raise BadRequest(
                    f"unexpected input '{tensor.name}': model '{self.name}' has inputs {list(self.inputs)}"
                )
            if tensor.name in feeds:
                raise BadRequest(f"input '{tensor.name}' is given twice")
            if tensor.datatype != spec.datatype:
                raise BadRequest(
                    f"input '{tensor.name}' has datatype {tensor.datatype}, the model expects {spec.datatype}"
                )
            if len(tensor.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, tensor.shape, strict=True)
            ):
                raise BadRequest(
                    f"input '{tensor.name}' has shape {list(tensor.shape)}, the model expects "
                    f"{list(spec.shape)} (-1: any size)"
                )
            feeds[tensor.name] = _onnx_strings(tensor) if spec.datatype == "BYTES" else tensor.data
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise BadRequest(f"missing input(s) {missing} for model '{self.name}'")
        return feeds, self._batch_size(tensors)

    def _batch_size(self, tensors: list[Tensor]) -> int:
        if not self.max_batch_size:
            return 1
        sizes = {t.shape[0] for t in tensors}
        if len(sizes) != 1:
            raise BadRequest(f"inputs disagree on the batch size (first dimension): {sorted(sizes)}")
        size = sizes.pop()
        if not 1 <= size <= self.max_batch_size:
            raise BadRequest(f"batch size {size} is outside 1..{self.max_batch_size} (--max-batch-size)")
        return size


def _onnx_strings(tensor: Tensor) -> np.ndarray:
    """OIP BYTES elements are bytes; ONNX Runtime's string tensors take str (UTF-8 text)."""
    try:
        text = [v.decode() if isinstance(v, bytes) else str(v) for v in tensor.data.ravel()]
    except UnicodeDecodeError as error:
        raise BadRequest(f"input '{tensor.name}' is not UTF-8 text, which ONNX strings must be: {error}") from None
    return np.array(text, dtype=object).reshape(tensor.data.shape)
