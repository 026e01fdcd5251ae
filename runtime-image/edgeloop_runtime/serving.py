"""What HTTP and gRPC share: the model, its batcher and metrics, readiness, and the protocol's documents."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgeloop_runtime import __version__
from edgeloop_runtime.batcher import Batcher
from edgeloop_runtime.errors import BadRequest, NotFound, Unavailable
from edgeloop_runtime.limits import Limits, MemoryBudget
from edgeloop_runtime.metrics import Duration, Metrics
from edgeloop_runtime.model import Model
from edgeloop_runtime.protocol.tensors import TRITON_CONFIG, Signature, Tensor
from edgeloop_runtime.shared_memory import SharedMemory

EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]


class Serving:
    def __init__(
        self,
        model: Model,
        *,
        max_queue: int,
        window_us: int,
        limits: Limits | None = None,
        shared_memory_dir: Path | None = None,
        node: str = "",
        accelerator: str = "",
    ) -> None:
        self.model = model
        self.window_us = window_us
        self.limits = limits or Limits()
        self.shared_memory = SharedMemory(shared_memory_dir, self.limits.max_shm_regions)
        self.budget = MemoryBudget(self.limits.max_inflight_bytes)
        self.signature = Signature(
            model.name,
            model.inputs,
            model.max_batch_size,
            max_elements=self.limits.max_tensor_elements,
            max_json_bytes=self.limits.max_json_bytes,
        )
        self.metrics = Metrics(model.name, model.version, model.sha256, model.providers, node, accelerator)
        self.batcher = Batcher(model, self.metrics, max_queue=max_queue, window_us=window_us)
        self.metrics.gauge(
            "nv_inference_pending_request_count", "Inference requests waiting for a batch.", self.batcher.depth
        )
        self.metrics.gauge("edgeloop_inflight_requests", "Inference requests in the server.", lambda: self.inflight)
        self.metrics.gauge("edgeloop_ready", "1 while the server accepts inference requests.", lambda: self.ready)
        self.metrics.gauge(
            "edgeloop_inflight_bytes", "Memory held by requests (--max-inflight-bytes).", lambda: self.budget.used
        )
        self.metrics.gauge(
            "edgeloop_warmup_seconds",
            "Time the warm-up of every allowed batch size took before the server turned ready.",
            lambda: model.warmup_seconds or 0.0,
        )
        self.inflight = 0
        self.warmed = False  # readiness waits for the warm-up
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.warmed and not self.draining

    def find(self, name: str, version: str | None) -> Model:
        if name != self.model.name or version not in (None, "", self.model.version):
            wanted = name + (f" version {version}" if version else "")
            raise NotFound(
                f"model '{wanted}' is not served here (serving '{self.model.name}' version {self.model.version})"
            )
        return self.model

    def call(self, protocol: str, received_ns: int | None = None) -> Call:
        return Call(self, protocol, received_ns)

    def submit(self, inputs: list[Tensor], outputs: list[str] | None) -> asyncio.Future:
        """Checks the request against the model and queues it; the future yields (outputs, (ns queued, and the
        batch's input, infer and output ns))."""
        if not self.ready:
            raise Unavailable("the server is shutting down" if self.draining else "the model is warming up")
        feeds, size = self.model.check(inputs)
        unknown = [name for name in outputs or () if name not in self.model.outputs]
        if unknown:
            raise BadRequest(f"unknown output(s) {unknown}: model '{self.model.name}' has {list(self.model.outputs)}")
        return self.batcher.submit(feeds, size)

    def server_metadata(self) -> dict:
        extensions = [*EXTENSIONS, "system_shared_memory"] if self.shared_memory.enabled else EXTENSIONS
        return {"name": "edgeloop", "version": __version__, "extensions": extensions}

    def model_metadata(self) -> dict:
        model = self.model
        return {
            "name": model.name,
            "versions": [model.version],
            "platform": model.backend.platform,
            "inputs": [spec.as_dict() for spec in model.inputs.values()],
            "outputs": [spec.as_dict() for spec in model.outputs.values()],
            # scalars only, as the Open Inference Protocol allows (CONTRACTS C2: providers comma-joined)
            "parameters": {"execution_providers": ",".join(model.providers), "sha256": model.sha256},
        }

    def model_config(self) -> dict:
        """Triton's model configuration; with batching, dims leave out the batch dimension, as in Triton."""
        model = self.model
        skip = 1 if model.max_batch_size else 0

        def tensors(specs):
            return [
                {"name": s.name, "data_type": TRITON_CONFIG[s.datatype], "dims": list(s.shape[skip:])}
                for s in specs.values()
            ]

        config = {
            "name": model.name,
            "platform": model.backend.platform,
            "backend": model.backend.name,
            "max_batch_size": model.max_batch_size,
            "input": tensors(model.inputs),
            "output": tensors(model.outputs),
            "instance_group": [{"name": model.name, "count": model.instances, "kind": model.device_kind}],
            "parameters": {
                "execution_providers": {"string_value": ",".join(model.providers)},
                "sha256": {"string_value": model.sha256},
            },
        }
        if model.max_batch_size:
            config["dynamic_batching"] = {
                "preferred_batch_size": list(model.batch_sizes),
                "max_queue_delay_microseconds": self.window_us,
            }
        return config

    def model_stats(self) -> dict:
        """Triton's statistics extension document."""
        stats = self.metrics.triton

        def duration(d):
            return {"count": d.count, "ns": d.ns}

        return {
            "model_stats": [
                {
                    "name": self.model.name,
                    "version": self.model.version,
                    "last_inference": stats.last_inference_ms,
                    "inference_count": stats.inference_count,
                    "execution_count": stats.execution_count,
                    "inference_stats": {
                        "success": duration(stats.success),
                        "fail": duration(stats.fail),
                        "queue": duration(stats.queue),
                        "compute_input": duration(stats.compute_input),
                        "compute_infer": duration(stats.compute_infer),
                        "compute_output": duration(stats.compute_output),
                        "cache_hit": duration(Duration()),
                        "cache_miss": duration(Duration()),
                    },
                    "batch_stats": [
                        {
                            "batch_size": size,
                            "compute_input": duration(batch.compute_input),
                            "compute_infer": duration(batch.compute_infer),
                            "compute_output": duration(batch.compute_output),
                        }
                        for size, batch in sorted(stats.batches.items())
                    ],
                }
            ]
        }


class Call:
    """One inference request in the server, from its last byte received to its answer encoded: the memory it
    holds, and the time it spent decoding, queued, in its batch and encoding (Triton counts them per request)."""

    __slots__ = ("batch_ns", "decode_ns", "encode_from", "held", "protocol", "queue_ns", "received", "serving")

    def __init__(self, serving: Serving, protocol: str, received_ns: int | None = None) -> None:
        self.serving = serving
        self.protocol = protocol
        self.received = received_ns or time.perf_counter_ns()
        self.held = 0
        self.decode_ns = 0
        self.queue_ns = 0
        self.batch_ns: tuple[int, int, int] | None = None  # the batch's input, infer and output ns, once it ran
        self.encode_from = 0
        serving.inflight += 1

    def reserve(self, size: int) -> None:
        """Holds `size` more bytes of the memory budget until the call finishes (raises when they do not fit)."""
        self.serving.budget.reserve(size)
        self.held += size

    def submit(self, inputs: list[Tensor], outputs: list[str] | None) -> asyncio.Future:
        self.decode_ns = time.perf_counter_ns() - self.received
        return self.serving.submit(inputs, outputs)

    def ran(self, future: asyncio.Future) -> dict:
        """The outputs of a submitted request (raises its error); what follows is encoding."""
        results, (self.queue_ns, *batch_ns) = future.result()
        self.batch_ns = tuple(batch_ns)
        self.encode_from = time.perf_counter_ns()
        return results

    def finish(self, outcome: str) -> None:
        """The answer is encoded (or the call failed): records it, and gives back what the call held."""
        now = time.perf_counter_ns()
        serving = self.serving
        serving.inflight -= 1
        serving.budget.release(self.held)
        self.held = 0
        encode_ns = now - self.encode_from if self.batch_ns else 0
        serving.metrics.request_done(self, outcome, now - self.received, encode_ns)
