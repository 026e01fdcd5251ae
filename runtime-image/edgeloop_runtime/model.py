"""The served model, whatever backend runs it: its signature, the batch sizes it runs at, how many instances
run it at once, its warm-up, and the check of requests against its signature."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from edgeloop_runtime.backends import KIND_CPU, Backend, LoadOptions, ModelLoadError, Session, TensorSpec
from edgeloop_runtime.errors import BadRequest
from edgeloop_runtime.protocol.tensors import NUMPY, Tensor

__all__ = ["Model", "ModelLoadError", "TensorSpec", "allowed_batch_sizes", "default_instances", "read_verified"]

log = logging.getLogger(__name__)

MAX_BATCH_SIZE = 4096  # bounds warm-up (one run per allowed size) and the largest batch a request may bring
MAX_INSTANCES = 256
ACCELERATOR_INSTANCES = 2  # on a GPU: one instance prepares a batch while the other runs one


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def allowed_batch_sizes(max_batch_size: int, requested: list[int] | None = None) -> tuple[int, ...]:
    """The only batch sizes a backend ever runs: the requested ones, or powers of two up to the maximum plus
    the maximum. The largest must be the maximum, so that any request that fits the limit fits a batch."""
    if max_batch_size <= 0:
        return ()
    if not requested:
        return tuple(sorted({*(1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size),
                             max_batch_size}))  # fmt: skip
    sizes = tuple(sorted(set(requested)))
    if sizes[0] < 1 or sizes[-1] != max_batch_size:
        raise ValueError(
            f"batch sizes {list(sizes)} must be within 1..{max_batch_size} and include --max-batch-size "
            f"({max_batch_size}), the largest batch a request may bring"
        )
    return sizes


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU limit of this container's cgroup (v2 cpu.max, or v1 cfs quota), in cores; None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> float:
    limit = cgroup_cpus()
    cores = len(os.sched_getaffinity(0))
    return min(limit, cores) if limit else cores


def default_instances(device_kind: str, threads: int, cpus: float) -> int:
    """--model-instances 0: as many instances as the CPU limit holds runs of --threads threads (at least one);
    one when the backend picks its own thread count (threads 0, which takes every core); two on an
    accelerator, so that the host prepares one batch while the device runs another."""
    if device_kind != KIND_CPU:
        return ACCELERATOR_INSTANCES
    if threads <= 0:
        return 1
    return max(1, min(MAX_INSTANCES, math.floor(cpus / threads + 0.01)))


class Model:
    """A backend's session with what the protocol reports about it and the limits the batcher follows."""

    def __init__(
        self,
        backend: Backend,
        session: Session,
        *,
        name: str,
        version: str,
        sha256: str,
        max_batch_size: int,
        batch_sizes: tuple[int, ...] = (),
        instances: int = 1,
    ) -> None:
        self.backend = backend
        self.session = session
        self.name = name
        self.version = version
        self.sha256 = sha256
        self.instances = instances
        self.providers: list[str] = list(session.providers)
        self.device_kind = session.device_kind
        self.inputs = {spec.name: spec for spec in session.inputs}
        self.outputs = {spec.name: spec for spec in session.outputs}
        self._output_names = list(self.outputs)
        specs = [*self.inputs.values(), *self.outputs.values()]
        has_batch_dim = all(spec.shape and spec.shape[0] == -1 for spec in specs)
        # Triton's convention: max_batch_size 0 means the model takes whole tensors, unbatched.
        self.max_batch_size = max_batch_size if has_batch_dim else 0
        self.batch_sizes = (batch_sizes or allowed_batch_sizes(max_batch_size)) if self.max_batch_size else ()
        if max_batch_size > 0 and not has_batch_dim:
            log.info("model %s has no dynamic first dimension on every tensor: dynamic batching is off", name)
        self.warmup_seconds: float | None = None

    @classmethod
    def load(
        cls,
        backend: Backend,
        data: bytes,
        options: LoadOptions,
        *,
        instances: int,
        name: str,
        version: str,
        sha256: str,
        max_batch_size: int,
        batch_sizes: tuple[int, ...] = (),
    ) -> Model:
        """Loads the model with `instances` instances (0: default_instances, from the device it runs on)."""
        session = backend.load(data, options)
        if instances <= 0:
            instances = default_instances(session.device_kind, options.threads, available_cpus())
        session.set_instances(instances)
        return cls(backend, session, name=name, version=version, sha256=sha256, max_batch_size=max_batch_size,
                   batch_sizes=batch_sizes, instances=instances)  # fmt: skip

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self.session.run(feeds), strict=True))

    def batch_size_for(self, samples: int) -> int:
        """The allowed batch size a batch of `samples` runs at (padded up to it)."""
        for size in self.batch_sizes:
            if size >= samples:
                return size
        raise ValueError(f"{samples} samples exceed the largest batch size {self.max_batch_size}")

    def warm_up(self) -> float:
        """Runs every allowed batch size once (only batch 1 without batching) on zeros, so that no request pays
        for lazy initialisation, a cuDNN algorithm search or an OpenVINO compile; returns the seconds taken.
        A model may reject zeros: serving does not depend on the warm-up succeeding."""
        started = time.perf_counter()
        for size in self.batch_sizes or (None,):
            feeds = {}
            for spec in self.inputs.values():
                shape = [d if d >= 0 else 1 for d in spec.shape]
                if size is not None:
                    shape[0] = size
                if spec.datatype == "BYTES":
                    feeds[spec.name] = self.session.strings(spec.name, np.full(shape, b"", dtype=object))
                else:
                    feeds[spec.name] = np.zeros(shape, dtype=NUMPY[spec.datatype])
            run_started = time.perf_counter()
            try:
                self.run(feeds)
            except Exception as error:  # any library error: the model is served anyway
                log.warning("warm-up at batch size %s failed (serving anyway): %s", size or 1, error)
                continue
            log.debug("warm-up at batch size %s: %.1f ms", size or 1, (time.perf_counter() - run_started) * 1e3)
        self.warmup_seconds = time.perf_counter() - started
        return self.warmup_seconds

    def check(self, tensors: list[Tensor]) -> tuple[dict[str, np.ndarray], int]:
        """The feeds for the backend and the request's batch size; BadRequest names what is wrong."""
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
            data = tensor.data
            feeds[tensor.name] = self.session.strings(tensor.name, data) if spec.datatype == "BYTES" else data
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
