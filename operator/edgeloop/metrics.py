"""The operator's Prometheus metrics, served at `/metrics` on their own port (`--metrics-port`).

Two kinds:
- what the operator does: reconciles per resource kind and how long they take (`reconciles` wraps a sync);
- what the fleet looks like: read at scrape time from the InferenceModels and FederatedRounds in the
  operator's indexes, i.e. from the status the operator itself wrote (conditions, nodes per variant, the
  providers the runtimes report, rounds' phase, accuracy and participants). Nothing is kept in between.

Labels name namespaces, models, rounds, accelerator classes and states, never nodes: at 1000 nodes the
series stay O(models x classes + rounds). Per-node figures come from the runtimes' own metrics.

With Kopf peering, only the replica that serves exports the fleet: a standby's indexes are not kept up to date
(Kopf pauses its watches), so what it would say is stale. `edgeloop_operator_active` says which one serves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from edgeloop.api.federatedround import FederatedRoundStatus
from edgeloop.api.inferencemodel import InferenceModelStatus
from edgeloop.config import CPU_EXECUTION_PROVIDER, OperatorConfig
from edgeloop.kube import Kind, KubeApi, KubeError

log = logging.getLogger(__name__)

DEFAULT_PORT = 9090
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PHASES = ("Pending", "Running", "Succeeded", "Failed")
NODE_STATES = ("desired", "ready", "updated")
PARTICIPANT_STATES = ("selected", "reported", "dropped")

# What the chart's dashboard and alerts read from the runtimes (CONTRACTS.md C7): Triton's names where the
# meaning is the same, edgeloop's histograms where Triton has none, and the info metric that names each
# runtime's model, version, digest, node, accelerator class and providers in use.
RUNTIME_METRICS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_pending_request_count",
    "nv_inference_queue_duration_us",
    "edgeloop_request_duration_seconds",
    "edgeloop_batch_size",
    "edgeloop_model_info",
)

# What the dashboard reads from a FederatedRound's aggregator while it runs (runtime-image/FEDERATED.md, "Metrics").
AGGREGATOR_METRICS = (
    "edgeloop_federated_rounds",
    "edgeloop_federated_rounds_completed",
    "edgeloop_federated_clients",
    "edgeloop_federated_accuracy",
    "edgeloop_federated_received_bytes",
)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
RECONCILES = Counter(
    "edgeloop_operator_reconciles",
    "Syncs of a custom resource, by kind and result (error: the sync raised and is retried).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "edgeloop_operator_reconcile_duration_seconds",
    "How long a sync of a custom resource took, API calls included.",
    ["kind"],
    buckets=RECONCILE_BUCKETS,
    registry=REGISTRY,
)
for _kind in ("InferenceModel", "FederatedRound"):  # present from the start, at 0
    for _result in ("success", "error"):
        RECONCILES.labels(_kind, _result)
    RECONCILE_SECONDS.labels(_kind)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def reconciles(kind: str) -> Callable[[F], F]:
    """Counts and times every call of an async sync function of `kind`."""

    def decorate(sync: F) -> F:
        @functools.wraps(sync)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started, result = time.perf_counter(), "error"
            try:
                value = await sync(*args, **kwargs)
                result = "success"
                return value
            finally:
                RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)
                RECONCILES.labels(kind, result).inc()

        return timed  # type: ignore[return-value]

    return decorate


# ---- the fleet, from the custom resources' status (pure)


def _status(body: Mapping[str, Any], model: type[Any]) -> Any | None:
    try:
        return model.model_validate(body.get("status") or {})
    except ValidationError:
        return None  # hand-edited into something else: nothing to say about it


def fleet(
    models: Iterable[Mapping[str, Any]], rounds: Iterable[Mapping[str, Any]], config: OperatorConfig
) -> list[Metric]:
    """The metric families of the fleet from the bodies of the InferenceModels and FederatedRounds."""
    im = ("namespace", "inferencemodel")
    info = GaugeMetricFamily(
        "edgeloop_inferencemodel_info",
        "The model version and digest an InferenceModel's DaemonSets are rendered for; always 1.",
        labels=[*im, "version", "sha256"],
    )
    conditions = GaugeMetricFamily(
        "edgeloop_inferencemodel_condition",
        "An InferenceModel's conditions (Ready, Progressing, Degraded, Accelerated): 1 when True, else 0.",
        labels=[*im, "condition", "status", "reason"],
    )
    nodes = GaugeMetricFamily(
        "edgeloop_inferencemodel_nodes",
        "Nodes of each variant: desired (should serve), ready, updated (run the version of "
        "edgeloop_inferencemodel_info; the others still run an older one).",
        labels=[*im, "accelerator", "state"],
    )
    unhealthy = GaugeMetricFamily(
        "edgeloop_inferencemodel_unhealthy_nodes",
        "Nodes that should serve but do not (status.unhealthyNodeCount).",
        labels=list(im),
    )
    providers = GaugeMetricFamily(
        "edgeloop_inferencemodel_providers",
        "The execution providers a variant's runtime reports it runs on (status.variants[].providersInUse, "
        "asked of one ready pod); always 1.",
        labels=[*im, "accelerator", "providers"],
    )
    fallback = GaugeMetricFamily(
        "edgeloop_inferencemodel_cpu_fallback",
        "1 when a variant of an accelerator class runs on none of its class's accelerator providers (CPU "
        "fallback), 0 when it does; only for variants whose runtime has been asked.",
        labels=[*im, "accelerator"],
    )
    for body in models:
        metadata = body["metadata"]
        key = [metadata["namespace"], metadata["name"]]
        status = _status(body, InferenceModelStatus)
        if status is None:
            continue
        if status.model is not None:
            info.add_metric([*key, status.model.version, status.model.sha256], 1)
        for c in status.conditions:
            conditions.add_metric([*key, c.type, c.status, c.reason], 1 if c.status == "True" else 0)
        for variant in status.variants:
            for state in NODE_STATES:
                nodes.add_metric([*key, variant.accelerator, state], getattr(variant, state))
            if not variant.providers_in_use:
                continue
            providers.add_metric([*key, variant.accelerator, ",".join(variant.providers_in_use)], 1)
            cls = config.accelerator_classes.get(variant.accelerator)
            wanted = {p for p in cls.execution_providers if p != CPU_EXECUTION_PROVIDER} if cls else set()
            if wanted:
                fallback.add_metric([*key, variant.accelerator], 0 if wanted & set(variant.providers_in_use) else 1)
        unhealthy.add_metric(key, status.unhealthy_node_count)

    fr = ("namespace", "federatedround", "inferencemodel")
    phase = GaugeMetricFamily(
        "edgeloop_federatedround_phase",
        "A FederatedRound's phase: 1 for the phase it is in, 0 for the others.",
        labels=[*fr, "phase"],
    )
    accuracy = GaugeMetricFamily(
        "edgeloop_federatedround_accuracy",
        "The trained model's federated accuracy (status.metrics.accuracy).",
        labels=list(fr),
    )
    baseline = GaugeMetricFamily(
        "edgeloop_federatedround_baseline_accuracy",
        "The starting model's federated accuracy on the same clients (status.baseline.accuracy).",
        labels=list(fr),
    )
    participants = GaugeMetricFamily(
        "edgeloop_federatedround_participants",
        "Clients of a FederatedRound: selected, reported (in the current or last training round's sum), dropped.",
        labels=[*fr, "state"],
    )
    training_round = GaugeMetricFamily(
        "edgeloop_federatedround_training_round",
        "The training round in progress, or the last one completed.",
        labels=list(fr),
    )
    training_rounds = GaugeMetricFamily(
        "edgeloop_federatedround_training_rounds", "Training rounds in all.", labels=list(fr)
    )
    for body in rounds:
        metadata = body["metadata"]
        model_ref = (body.get("spec") or {}).get("modelRef") or {}
        key = [metadata["namespace"], metadata["name"], str(model_ref.get("name", ""))]
        status = _status(body, FederatedRoundStatus)
        if status is None:
            continue
        for name in PHASES:
            phase.add_metric([*key, name], 1 if status.phase == name else 0)
        if status.metrics is not None:
            accuracy.add_metric(key, status.metrics.accuracy)
        if status.baseline is not None:
            baseline.add_metric(key, status.baseline.accuracy)
        for state in PARTICIPANT_STATES:
            participants.add_metric([*key, state], getattr(status.participants, state))
        training_round.add_metric(key, status.round)
        training_rounds.add_metric(key, status.rounds or 0)
    return [
        info,
        conditions,
        nodes,
        unhealthy,
        providers,
        fallback,
        phase,
        accuracy,
        baseline,
        participants,
        training_round,
        training_rounds,
    ]


# ---- which replica serves (Kopf peering)


@dataclass(frozen=True)
class Peering:
    """The operator's Kopf peering: `name` None when standalone; `namespaces` None when cluster-wide."""

    name: str | None
    namespaces: tuple[str, ...] | None
    priority: int


CLUSTER_PEERING = Kind("kopf.dev/v1", "ClusterKopfPeering", "clusterkopfpeerings", namespaced=False)
NAMESPACED_PEERING = Kind("kopf.dev/v1", "KopfPeering", "kopfpeerings")


def outranked(peers: Mapping[str, Any], priority: int, now: datetime) -> bool:
    """Whether Kopf pauses this replica, from a peering object's status ({identity: {priority, lifetime,
    lastseen}}): it serves when it is the only live peer with the highest priority (equal priorities all
    pause). Not listed yet (before its first keep-alive) counts as outranked, as Kopf starts paused."""
    alive = []
    for peer in peers.values():
        try:
            seen = datetime.fromisoformat(str(peer["lastseen"]))
            seen = seen if seen.tzinfo else seen.replace(tzinfo=UTC)
            if (now - seen).total_seconds() < float(peer.get("lifetime", 60)):
                alive.append(int(peer.get("priority", 0)))
        except (KeyError, TypeError, ValueError):
            continue
    return alive.count(priority) != 1 or max(alive) > priority


class Leadership:
    """Whether this replica serves, from the peering objects, read at most every `refresh` seconds (one list
    call per peering object). Standalone: always."""

    def __init__(
        self, kube: KubeApi, peering: Peering, refresh: float = 10.0, clock: Callable[[], float] = time.monotonic
    ):
        self._kube, self._peering, self._refresh, self._clock = kube, peering, refresh, clock
        self._checked: float | None = None
        self._active = peering.name is None

    async def active(self) -> bool:
        if self._peering.name is None:
            return True
        if self._checked is None or self._clock() - self._checked >= self._refresh:
            self._checked = self._clock()
            try:
                self._active = await asyncio.to_thread(self._read)
            except KubeError as error:  # keep the last answer; the next scrape asks again
                log.warning("cannot read the peering object %s: %s", self._peering.name, error)
        return self._active

    def _read(self) -> bool:
        name, now = self._peering.name, datetime.now(UTC)
        namespaces = self._peering.namespaces
        scopes = [(CLUSTER_PEERING, "")] if namespaces is None else [(NAMESPACED_PEERING, ns) for ns in namespaces]
        for kind, namespace in scopes:
            found = list(self._kube.list(kind, namespace, field_selector=f"metadata.name={name}"))
            if not found or outranked(found[0].get("status") or {}, self._peering.priority, now):
                return False
        return True


# ---- the endpoint


def _bodies(index: Mapping[Any, Any], namespaces: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The one body each key of a Kopf index holds, for the namespaces that are live."""
    for key, bodies in list(index.items()):
        body = next(iter(bodies), None)
        if body is not None and key[0] in namespaces:
            yield body


class FleetCollector:
    """A prometheus_client collector over the operator's indexes; collected in the event loop's thread, where
    Kopf changes the indexes, by the `/metrics` handler."""

    def __init__(
        self,
        config: OperatorConfig,
        models: Mapping[Any, Any],
        rounds: Mapping[Any, Any],
        namespaces: Mapping[str, Any],
    ):
        self._config, self._models, self._rounds, self._namespaces = config, models, rounds, namespaces
        self.active = True

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "edgeloop_operator_active",
            "1 on the replica that serves (Kopf peering), 0 on a standby; only the serving one exports the fleet.",
        )
        active.add_metric([], 1 if self.active else 0)
        yield active
        if self.active:
            yield from fleet(
                _bodies(self._models, self._namespaces), _bodies(self._rounds, self._namespaces), self._config
            )


async def serve(port: int, collector: FleetCollector, leadership: Leadership, host: str = "0.0.0.0") -> Any:
    """Serves `/metrics` in the running event loop; returns the aiohttp runner (`await runner.cleanup()`)."""
    from aiohttp import web  # Kopf's own dependency, for its liveness endpoint too

    registry = CollectorRegistry()
    registry.register(collector)

    async def metrics(_: web.Request) -> web.Response:
        collector.active = await leadership.active()
        body = generate_latest(REGISTRY) + generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("serving metrics on %s:%d/metrics", host, port)
    return runner


def peering_from(name: str | None, namespaces: Iterable[str], priority: int) -> Peering:
    """Kopf keeps one peering object in each namespace it watches, or one cluster-wide (no namespaces). Only
    literal names are looked at (the chart's are): a glob's namespaces are not known here."""
    namespaces = tuple(namespaces)
    return Peering(
        name, tuple(ns for ns in namespaces if not any(ch in ns for ch in "*?[")) if namespaces else None, priority
    )
