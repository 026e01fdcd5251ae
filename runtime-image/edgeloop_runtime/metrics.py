"""Prometheus metrics in the text exposition format, and Triton's per-model statistics.

Triton's metric names where the meaning is the same (nv_inference_*, labels model and version), read from the
very counters behind the statistics extension, so /metrics and …/stats always agree; edgeloop_* for the rest.
`edgeloop_model_info` carries what identifies the runtime (digest, node, accelerator, providers in use), to
be joined on model and version. The names are a contract (CONTRACTS.md, "Runtime metrics").

Everything here is updated from the event loop's thread only, so nothing needs a lock.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"


# An inference failure's outcome → the `reason` label of nv_inference_request_failure (Triton's categories).
FAILURE_REASONS = {"unavailable": "REJECTED", "cancelled": "CANCELED", "error": "BACKEND"}  # else OTHER


class Counter:
    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_text, labelnames
        self.values: dict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, *labels: str, amount: float = 1) -> None:
        self.values[labels] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(self.labelnames, k)} {v:g}" for k, v in self.values.items()]
        return lines


class Gauge:
    """A gauge whose value is read when scraped."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float], labels: dict[str, str]) -> None:
        self.name, self.help, self.read, self.labels = name, help_text, read, labels

    def render(self) -> list[str]:
        label_text = _labels(tuple(self.labels), tuple(self.labels.values()))
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name}{label_text} {self.read():g}",
        ]


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...], labelnames: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.buckets, self.labelnames = name, help_text, buckets, labelnames
        # per label set: counts per bucket (non-cumulative; the last slot is +Inf), sum
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = ([0] * (len(self.buckets) + 1), [0.0])
        series[0][bisect.bisect_left(self.buckets, value)] += 1
        series[1][0] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, (counts, total) in self.series.items():
            cumulative = 0
            for bound, count in zip((*self.buckets, "+Inf"), counts, strict=True):
                cumulative += count
                le = bound if isinstance(bound, str) else f"{bound:g}"
                lines.append(f"{self.name}_bucket{_labels((*self.labelnames, 'le'), (*labels, le))} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, labels)} {total[0]:g}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, labels)} {cumulative}")
        return lines


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class TritonStats:
    """The counters behind Triton's statistics extension (`…/stats`, ModelStatistics), counted as Triton does:
    durations per request (each request of a batch is charged the batch's compute, plus its own decoding in
    compute_input and its own encoding in compute_output), counts of samples and of batches."""

    last_inference_ms: int = 0
    inference_count: int = 0  # requests' batch sizes added up
    execution_count: int = 0  # batches run
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)  # by batch size, per execution

    def record_batch(self, size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += size
        self.execution_count += 1
        batch = self.batches.get(size)
        if batch is None:
            batch = self.batches[size] = BatchStats()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def record_request(self, success: bool, total_ns: int, call, encode_ns: int) -> None:
        (self.success if success else self.fail).add(total_ns)
        if call.batch_ns is not None:
            input_ns, infer_ns, output_ns = call.batch_ns
            self.queue.add(call.queue_ns)
            self.compute_input.add(call.decode_ns + input_ns)
            self.compute_infer.add(infer_ns)
            self.compute_output.add(output_ns + encode_ns)


class Metrics:
    def __init__(
        self, model: str, version: str, sha256: str, providers: list[str], node: str = "", accelerator: str = ""
    ) -> None:
        self.model, self.version = model, version
        self.labels = {"model": model, "version": version}
        self.info = Gauge(
            "edgeloop_model_info",
            "What this runtime serves, where, and with which providers; always 1. Join on model and version.",
            lambda: 1,
            {**self.labels, "sha256": sha256, "node": node, "accelerator": accelerator,
             "providers": ",".join(providers)},
        )  # fmt: skip
        self.requests = Counter(
            "edgeloop_requests_total",
            "Requests by protocol and outcome, those refused before they were read whole included.",
            ("model", "version", "protocol", "outcome"),
        )
        self.failures = Counter(
            "nv_inference_request_failure",
            "Failed inference requests (Triton's metric): reason REJECTED (no room: queue, memory, draining), "
            "CANCELED, BACKEND (the model failed), OTHER (the request was wrong).",
            ("model", "version", "reason"),
        )
        for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):  # every series exists from the start, at 0
            self.failures.inc(model, version, reason, amount=0)
        self.latency = Histogram(
            "edgeloop_request_duration_seconds",
            "Inference request latency in the server, from the full request to the encoded response.",
            LATENCY_BUCKETS,
            ("model", "version", "protocol"),
        )
        self.inference = Histogram(
            "edgeloop_inference_duration_seconds", "Backend run time per batch.", LATENCY_BUCKETS, ("model", "version")
        )
        self.batch_size = Histogram(
            "edgeloop_batch_size", "Batch size (in samples) of each backend run.", BATCH_BUCKETS, ("model", "version")
        )
        self.gauges: list[Gauge] = []
        self.triton = TritonStats()

    def gauge(self, name: str, help_text: str, read: Callable[[], float], **labels: str) -> None:
        self.gauges.append(Gauge(name, help_text, read, {**self.labels, **labels}))

    def request_done(self, call, outcome: str, total_ns: int, encode_ns: int) -> None:
        """An inference request (a serving.Call) answered, `total_ns` after it was received."""
        self.requests.inc(self.model, self.version, call.protocol, outcome)
        self.latency.observe(total_ns / 1e9, self.model, self.version, call.protocol)
        self.triton.record_request(outcome == "success", total_ns, call, encode_ns)
        if outcome != "success":
            self.failures.inc(self.model, self.version, FAILURE_REASONS.get(outcome, "OTHER"))

    def refused(self, protocol: str, outcome: str) -> None:
        """A request refused before it was read whole (too large, too slow, malformed, no room)."""
        self.requests.inc(self.model, self.version, protocol, outcome)

    def batch_done(self, size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.batch_size.observe(size, self.model, self.version)
        self.inference.observe(infer_ns / 1e9, self.model, self.version)
        self.triton.record_batch(size, input_ns, infer_ns, output_ns)

    def _triton_counters(self) -> list[str]:
        """Triton's per-model counters, from the statistics' own counts (durations in µs, per request)."""
        stats = self.triton
        label_text = _labels(("model", "version"), (self.model, self.version))
        counters = (
            ("nv_inference_request_success", "Successful inference requests.", stats.success.count),
            ("nv_inference_count", "Inferences performed (a batch of n counts n).", stats.inference_count),
            ("nv_inference_exec_count", "Batches run.", stats.execution_count),
            ("nv_inference_request_duration_us", "Cumulative time of successful requests, received to answered.",
             stats.success.ns // 1000),
            ("nv_inference_queue_duration_us", "Cumulative time requests waited for their batch.",
             stats.queue.ns // 1000),
            ("nv_inference_compute_input_duration_us", "Cumulative time requests' inputs took to decode and batch.",
             stats.compute_input.ns // 1000),
            ("nv_inference_compute_infer_duration_us", "Cumulative time requests' batches ran.",
             stats.compute_infer.ns // 1000),
            ("nv_inference_compute_output_duration_us", "Cumulative time requests' outputs took to split and encode.",
             stats.compute_output.ns // 1000),
        )  # fmt: skip
        lines = []
        for name, help_text, value in counters:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name}{label_text} {value}"]
        return lines

    def render(self) -> bytes:
        lines = self._triton_counters()
        for metric in (self.failures, self.info, self.requests, self.latency, self.inference, self.batch_size,
                       *self.gauges):  # fmt: skip
            lines += metric.render()
        return ("\n".join(lines) + "\n").encode()
