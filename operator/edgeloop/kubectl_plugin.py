"""`kubectl edgeloop`: the fleet seen per node, and the federated rounds, from your kubeconfig.

    kubectl edgeloop nodes [MODEL] [-n NAMESPACE | -A] [-o wide|json|yaml] [--window SECONDS]
    kubectl edgeloop rounds [ROUND] [-n NAMESPACE | -A] [-o wide|json|yaml]

`nodes` prints one row per node that runs a model: its variant (accelerator class), the model version and
digest its pod was started with, its pod's status and restarts, and what its runtime itself says: the
execution providers in use (`GET /v2/models/<name>`) and its req/s and p99 latency over a short window
(two reads of its `/metrics`, `--window` seconds apart). The runtime is reached through the API server's pod
proxy, as your user: reading pods and the custom resources is enough for the rows; `get pods/proxy` adds what
the runtimes say (without it those columns show `-`). `rounds` prints each FederatedRound with the accuracy of
the starting and of the trained model.

Installed as a console script named `kubectl-edgeloop`, so `kubectl edgeloop ...` finds it on PATH.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml
from urllib3.exceptions import HTTPError

from edgeloop.kube import Kind, Kube, KubeError
from edgeloop.names import ACCELERATOR_LABEL, INFERENCE_COMPONENT, INFERENCE_MODEL_LABEL, RUNTIME_APP, RUNTIME_CONTAINER
from edgeloop.status.inferencemodel import parse_providers

POD = Kind("v1", "Pod", "pods")
FEDERATED_ROUND = Kind("edgeloop.io/v1alpha1", "FederatedRound", "federatedrounds")
LATENCY = "edgeloop_request_duration_seconds"  # the runtime's request latency histogram (seconds)
# Runtimes asked at once through the API server.
PARALLEL = 16
NONE = "-"


# ---- reading what the runtimes say (pure)


@dataclass(frozen=True)
class Histogram:
    """One scrape of a cumulative histogram, summed over its series: upper bounds and cumulative counts."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    @property
    def total(self) -> float:
        return self.counts[-1] if self.counts else 0.0


def histogram(text: str, name: str = LATENCY) -> Histogram:
    """The `name` histogram of a Prometheus text exposition, its series (protocols, ...) added up."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    bounds = tuple(sorted(buckets))
    return Histogram(bounds, tuple(buckets[b] for b in bounds))


def observed(before: Histogram, after: Histogram) -> Histogram:
    """What was observed between two scrapes; everything since the later one's start if the runtime restarted
    in between (its counts went down)."""
    if before.bounds != after.bounds or after.total < before.total:
        return after
    return Histogram(after.bounds, tuple(a - b for a, b in zip(after.counts, before.counts, strict=True)))


def quantile(q: float, histogram: Histogram) -> float | None:
    """The q-quantile of a histogram, interpolated within buckets as Prometheus's histogram_quantile does;
    None when it is empty."""
    if histogram.total <= 0:
        return None
    rank = q * histogram.total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(histogram.bounds, histogram.counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # in the +Inf bucket: the highest finite bound, as Prometheus says
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def runtime_args(pod: Mapping[str, Any]) -> dict[str, str]:
    """The runtime container's `--flag value` pairs (and bare flags, as ""), from the pod's own spec."""
    container = next(
        (c for c in pod["spec"].get("containers", []) if c.get("name") == RUNTIME_CONTAINER),
        {"args": []},
    )
    args, flags = [*container.get("command", [])[1:], *container.get("args", [])], {}
    for index, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[index + 1] if index + 1 < len(args) else ""
            flags[arg[2:]] = "" if following.startswith("--") else following
    return flags


def pod_status(pod: Mapping[str, Any]) -> str:
    """What kubectl get pods shows as STATUS: a container's waiting or terminated reason, else the phase."""
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    statuses = [*pod["status"].get("initContainerStatuses", []), *pod["status"].get("containerStatuses", [])]
    for status in statuses:
        state = status.get("state", {})
        reason = (state.get("waiting") or {}).get("reason") or (state.get("terminated") or {}).get("reason")
        if reason and reason != "Completed":
            return reason
    phase = pod["status"].get("phase", "Unknown")
    containers = pod["status"].get("containerStatuses", [])
    ready = bool(containers) and all(c.get("ready") for c in containers)
    return phase if phase != "Running" or ready else "Running (not ready)"


def age(timestamp: str, now: datetime) -> str:
    """AGE as kubectl rounds it, without its two-unit forms: 95s, 42m, 30h, 12d."""
    if not timestamp:
        return NONE
    elapsed = max(int((now - datetime.fromisoformat(timestamp.replace("Z", "+00:00"))).total_seconds()), 0)
    for unit, size, below in (("s", 1, 120), ("m", 60, 120 * 60), ("h", 3600, 48 * 3600)):
        if elapsed < below:
            return f"{elapsed // size}{unit}"
    return f"{elapsed // 86400}d"


def node_row(pod: Mapping[str, Any]) -> dict[str, Any]:
    args, labels = runtime_args(pod), pod["metadata"].get("labels", {})
    return {
        "namespace": pod["metadata"]["namespace"],
        "node": pod["spec"].get("nodeName", ""),
        "model": labels.get(INFERENCE_MODEL_LABEL, ""),
        "variant": labels.get(ACCELERATOR_LABEL, ""),
        "version": args.get("model-version", ""),
        "sha256": args.get("sha256", ""),
        "providers": [],
        "pod": pod["metadata"]["name"],
        "status": pod_status(pod),
        "restarts": sum(s.get("restartCount", 0) for s in pod["status"].get("containerStatuses", [])),
        "requestsPerSecond": None,
        "p99Seconds": None,
        "runtime": "",  # why the runtime did not answer, if it did not
    }


def round_row(body: Mapping[str, Any]) -> dict[str, Any]:
    status, spec = body.get("status") or {}, body.get("spec") or {}
    participants = status.get("participants") or {}
    metrics, baseline = status.get("metrics") or {}, status.get("baseline") or {}
    return {
        "namespace": body["metadata"]["namespace"],
        "name": body["metadata"]["name"],
        "model": (spec.get("modelRef") or {}).get("name", ""),
        "phase": status.get("phase", "Pending"),
        "round": status.get("progress", ""),
        "selected": participants.get("selected", 0),
        "reported": participants.get("reported", 0),
        "dropped": participants.get("dropped", 0),
        "baselineAccuracy": baseline.get("accuracy"),
        "accuracy": metrics.get("accuracy"),
        "promoted": bool(status.get("promoted")),
        "version": (status.get("result") or {}).get("version", ""),
        "created": body["metadata"].get("creationTimestamp", ""),
    }


# ---- printing


def three_digits(value: float | None) -> str:
    return NONE if value is None else f"{value:#.3g}"


def seconds(value: float | None) -> str:
    if value is None:
        return NONE
    return f"{value * 1000:#.3g}ms" if value < 1 else f"{value:#.3g}s"


Column = tuple[str, Callable[[dict[str, Any]], str]]

NODE_COLUMNS: list[Column] = [
    ("NODE", lambda r: r["node"]),
    ("MODEL", lambda r: r["model"]),
    ("VARIANT", lambda r: r["variant"]),
    ("VERSION", lambda r: r["version"]),
    ("DIGEST", lambda r: r["sha256"][:12]),
    ("PROVIDERS", lambda r: ",".join(r["providers"]) or NONE),
    ("STATUS", lambda r: r["status"]),
    ("RESTARTS", lambda r: str(r["restarts"])),
    ("REQ/S", lambda r: NONE if r["requestsPerSecond"] is None else f"{r['requestsPerSecond']:.1f}"),
    ("P99", lambda r: seconds(r["p99Seconds"])),
]
NODE_WIDE: list[Column] = [("POD", lambda r: r["pod"]), ("SHA256", lambda r: r["sha256"])]


def round_columns(now: datetime) -> list[Column]:
    return [
        ("NAME", lambda r: r["name"]),
        ("MODEL", lambda r: r["model"] or NONE),
        ("PHASE", lambda r: r["phase"]),
        ("ROUND", lambda r: r["round"] or NONE),
        ("CLIENTS", lambda r: f"{r['reported']}/{r['selected']}"),
        ("BASELINE", lambda r: three_digits(r["baselineAccuracy"])),
        ("ACCURACY", lambda r: three_digits(r["accuracy"])),
        ("PROMOTED", lambda r: str(r["promoted"]).lower()),
        ("AGE", lambda r: age(r["created"], now)),
    ]


ROUND_WIDE: list[Column] = [("DROPPED", lambda r: str(r["dropped"])), ("VERSION", lambda r: r["version"] or NONE)]


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], all_namespaces: bool) -> str:
    """Aligned columns as kubectl prints them: upper-case headers, three spaces between columns."""
    if all_namespaces:
        columns = [("NAMESPACE", lambda r: r["namespace"]), *columns]
    cells = [[header for header, _ in columns], *[[cell(row) for _, cell in columns] for row in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "".join("   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n" for line in cells)


def output(
    rows: list[dict[str, Any]],
    fmt: str,
    columns: Sequence[Column],
    wide: Sequence[Column],
    all_namespaces: bool,
    what: str,
    namespace: str,
) -> str:
    if fmt in ("json", "yaml"):
        document = {"apiVersion": "v1", "kind": "List", "items": rows}
        return json.dumps(document, indent=2) + "\n" if fmt == "json" else yaml.safe_dump(document, sort_keys=False)
    if not rows:
        return "No resources found.\n" if all_namespaces else f"No {what} found in {namespace} namespace.\n"
    return table(rows, [*columns, *wide] if fmt == "wide" else columns, all_namespaces)


# ---- the cluster


class Plugin:
    def __init__(self, kube: Kube, warn: Callable[[str], None]):
        self.kube, self.warn = kube, warn

    def nodes(self, namespace: str, model: str | None, window: float) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/name={RUNTIME_APP},app.kubernetes.io/component={INFERENCE_COMPONENT}"
        selector += f",{INFERENCE_MODEL_LABEL}={model}" if model else ""
        pods = [p for p in self.kube.list(POD, namespace, label_selector=selector) if p["spec"].get("nodeName")]
        rows = [node_row(pod) for pod in pods]
        running = [(pod, row) for pod, row in zip(pods, rows, strict=True) if pod["status"].get("phase") == "Running"]
        with ThreadPoolExecutor(PARALLEL) as pool:
            first = list(pool.map(self._read_runtime, [pod for pod, _ in running]))
            started = time.monotonic()
            answered = [
                (pod, row, read) for (pod, row), read in zip(running, first, strict=True) if not isinstance(read, str)
            ]
            if window > 0 and answered:
                time.sleep(window)
                second = list(pool.map(self._read_metrics, [pod for pod, _, _ in answered]))
            else:
                second = [None] * len(answered)
            elapsed = time.monotonic() - started
        for (_, row), read in zip(running, first, strict=True):
            if isinstance(read, str):
                row["runtime"] = read
        for (_, row, (providers, before)), after in zip(answered, second, strict=True):
            row["providers"] = list(providers)
            if isinstance(after, str):
                row["runtime"] = after
            elif after is not None:
                window_counts = observed(before, after)
                row["requestsPerSecond"] = window_counts.total / elapsed
                row["p99Seconds"] = quantile(0.99, window_counts)
        if any("HTTP 403" in row["runtime"] for row in rows):
            self.warn(
                "Warning: your user may not get pods/proxy: what the runtimes say (PROVIDERS, REQ/S, P99) is left out"
            )
        return sorted(rows, key=lambda r: (r["namespace"], r["model"], r["node"]))

    def _target(self, pod: Mapping[str, Any]) -> tuple[str, str, int, bool, str]:
        args = runtime_args(pod)
        return (
            pod["metadata"]["namespace"],
            pod["metadata"]["name"],
            int(args.get("http-port") or 8000),
            "tls-cert" in args,
            args.get("model-name", ""),
        )

    def _read_runtime(self, pod: Mapping[str, Any]) -> tuple[tuple[str, ...], Histogram] | str:
        """Providers in use and a first read of the latency histogram, or why the runtime did not answer."""
        namespace, name, port, https, model = self._target(pod)
        try:
            answer = self.kube.proxy_get(namespace, name, port, f"/v2/models/{model}", https=https)
            metrics = self.kube.proxy_get(namespace, name, port, "/metrics", https=https)
            return parse_providers(answer), histogram(metrics)
        except (KubeError, ValueError, HTTPError) as error:
            return f"{error}"[:200]

    def _read_metrics(self, pod: Mapping[str, Any]) -> Histogram | str:
        namespace, name, port, https, _ = self._target(pod)
        try:
            return histogram(self.kube.proxy_get(namespace, name, port, "/metrics", https=https))
        except (KubeError, ValueError, HTTPError) as error:
            return f"{error}"[:200]

    def rounds(self, namespace: str, name: str | None) -> list[dict[str, Any]]:
        selector = f"metadata.name={name}" if name else ""
        rows = [round_row(body) for body in self.kube.list(FEDERATED_ROUND, namespace, field_selector=selector)]
        return sorted(rows, key=lambda r: (r["namespace"], r["created"], r["name"]))


def connect(kubeconfig: str | None, context: str | None) -> tuple[Kube, str]:
    """The API client of your kubeconfig's context, and that context's namespace."""
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    configuration.connection_pool_maxsize = PARALLEL
    contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    chosen = next((c for c in contexts if c["name"] == context), active) if context else active
    return Kube(client.ApiClient(configuration)), (chosen.get("context") or {}).get("namespace") or "default"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl edgeloop", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    scope = common.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="the namespace (default: your context's)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    common.add_argument("-o", "--output", choices=["wide", "json", "yaml"], help="output format")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context (default: the current one)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nodes = sub.add_parser("nodes", parents=[common], help="one row per node that runs a model")
    nodes.add_argument("model", nargs="?", help="only this InferenceModel")
    nodes.add_argument(
        "--window",
        type=float,
        default=2.0,
        help="seconds between the two reads of each runtime's metrics that REQ/S and P99 cover (default 2; 0: "
        "one read, no REQ/S or P99)",
    )
    rounds = sub.add_parser("rounds", parents=[common], help="FederatedRounds with their accuracy")
    rounds.add_argument("round", nargs="?", help="only this FederatedRound")
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    if args.command == "nodes" and not 0 <= args.window <= 60:
        print("error: --window must be between 0 and 60 seconds", file=sys.stderr)
        return 2
    try:
        kube, default_namespace = connect(args.kubeconfig, args.context)
    except Exception as error:  # the kubernetes client raises several kinds for a missing or bad kubeconfig
        print(f"error: cannot load the kubeconfig: {error}", file=sys.stderr)
        return 1
    namespace = "" if args.all_namespaces else args.namespace or default_namespace
    plugin = Plugin(kube, warn=lambda message: print(message, file=sys.stderr))
    now = datetime.now(UTC)
    try:
        if args.command == "nodes":
            rows = plugin.nodes(namespace, args.model, args.window)
            text = output(rows, args.output or "", NODE_COLUMNS, NODE_WIDE, args.all_namespaces, "nodes", namespace)
        else:
            rows = plugin.rounds(namespace, args.round)
            text = output(
                rows,
                args.output or "",
                round_columns(now),
                ROUND_WIDE,
                args.all_namespaces,
                "federatedrounds",
                namespace,
            )
    except KubeError as error:
        print(f"Error from server: {error}", file=sys.stderr)
        return 1
    except HTTPError as error:
        print(f"error: cannot reach the API server: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
