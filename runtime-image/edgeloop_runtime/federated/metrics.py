"""The aggregator's Prometheus metrics (text exposition format 0.0.4): round progress, clients, bytes received,
requests, and the HTTP server's connections. Gauges are read from the aggregator's state when scraped; the
counters of what arrived over HTTP are kept here, under a lock (many request threads)."""

from __future__ import annotations

import threading
from collections import defaultdict

ENDPOINTS = ("/v1/round", "/v1/model", "/v1/weights", "/v1/status", "/v1/join", "/v1/shares", "/v1/update",
             "/v1/unmask", "/v1/evaluate", "/healthz", "/metrics")  # fmt: skip
STAGES = ("join", "share", "collect", "unmask")
PHASES = ("Running", "Succeeded", "Failed")


def endpoint(path: str) -> str:
    """A bounded label: the known endpoints, everything else is `other`."""
    path = path.split("?", 1)[0]
    return path if path in ENDPOINTS else "other"


class HTTPCounters:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (endpoint, code)
        self.received: dict[str, int] = defaultdict(int)  # endpoint → bytes

    def request(self, path: str, code: int) -> None:
        with self.lock:
            self.requests[endpoint(path), str(code)] += 1

    def bytes_in(self, path: str, size: int) -> None:
        with self.lock:
            self.received[endpoint(path)] += size


def _line(name: str, value: float, **labels: str) -> str:
    text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{text}}} {value:g}" if labels else f"{name} {value:g}"


def render(agg, counters: HTTPCounters, servers) -> str:
    """The exposition text. `agg` is an Aggregator, `servers` the BoundedHTTPServers serving it."""
    with agg.cond:
        status = agg.status()
        current = agg.round
        joined = len(current.members) if current is not None else 0
    history = status["history"]
    latest = status["metrics"] or (history[-1]["metricsBefore"] if history else None) or {}
    families: list[tuple[str, str, str, list[str]]] = [
        ("edgeloop_federated_round", "gauge", "the round in progress, or the last completed one",
         [_line("edgeloop_federated_round", status["round"])]),
        ("edgeloop_federated_rounds", "gauge", "rounds the job trains",
         [_line("edgeloop_federated_rounds", status["rounds"])]),
        ("edgeloop_federated_rounds_completed", "gauge", "rounds completed (checkpointed)",
         [_line("edgeloop_federated_rounds_completed", len(history))]),
        ("edgeloop_federated_rounds_discarded_total", "counter", "rounds whose secure sum was impossible",
         [_line("edgeloop_federated_rounds_discarded_total", sum("discarded" in h for h in history))]),
        ("edgeloop_federated_phase", "gauge", "1 for the job's phase",
         [_line("edgeloop_federated_phase", int(status["phase"] == p), phase=p) for p in PHASES]),
        ("edgeloop_federated_stage", "gauge", "1 for the stage of the round in progress",
         [_line("edgeloop_federated_stage", int(status["stage"] == s), stage=s) for s in STAGES]),
        ("edgeloop_federated_clients", "gauge", "clients of the round in progress (or the last one), by state",
         [_line("edgeloop_federated_clients", status["participants"]["selected"], state="selected"),
          _line("edgeloop_federated_clients", joined, state="joined"),
          _line("edgeloop_federated_clients", status["participants"]["reported"], state="reported")]),
        ("edgeloop_federated_dropped_clients_total", "counter", "clients dropped from completed rounds",
         [_line("edgeloop_federated_dropped_clients_total", sum(h["participants"]["dropped"] for h in history))]),
        ("edgeloop_federated_accuracy", "gauge",
         "median holdout accuracy of the latest federated evaluation (the final model's once evaluated)",
         [_line("edgeloop_federated_accuracy", latest["accuracy"])] if latest else []),
        ("edgeloop_federated_loss", "gauge", "median holdout loss of the latest federated evaluation",
         [_line("edgeloop_federated_loss", latest["loss"])] if latest else []),
        ("edgeloop_federated_round_duration_seconds", "gauge", "how long the last completed round took",
         [_line("edgeloop_federated_round_duration_seconds", history[-1]["seconds"])] if history else []),
    ]  # fmt: skip
    with counters.lock:
        requests = sorted(counters.requests.items())
        received = sorted(counters.received.items())
    families += [
        ("edgeloop_federated_received_bytes_total", "counter", "bytes of requests received (line, headers, body)",
         [_line("edgeloop_federated_received_bytes_total", v, endpoint=e) for e, v in received]),
        ("edgeloop_federated_requests_total", "counter", "requests answered, by endpoint and status code",
         [_line("edgeloop_federated_requests_total", v, endpoint=e, code=c) for (e, c), v in requests]),
        ("edgeloop_federated_connections", "gauge", "open connections",
         [_line("edgeloop_federated_connections", sum(s.open_connections() for s in servers))]),
        ("edgeloop_federated_connections_evicted_total", "counter", "slow connections closed at the cap",
         [_line("edgeloop_federated_connections_evicted_total", sum(s.evicted_connections for s in servers))]),
        ("edgeloop_federated_connections_refused_total", "counter", "connections refused at the cap (503)",
         [_line("edgeloop_federated_connections_refused_total", sum(s.refused_connections for s in servers))]),
    ]  # fmt: skip
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n"
