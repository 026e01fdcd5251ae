"""InferenceModel handlers: Kopf glue around one `sync` that renders, applies what changed, and reports.

What the operator knows of the cluster comes from Kopf indexes fed by watches (InferenceModels, the
DaemonSets and Services it manages, Nodes, Namespaces), so a sync of an unchanged object makes no API call at all:
each rendered object carries the hash of its content, and only objects whose hash differs are applied
(server-side apply). Pods are listed only for a variant that has nodes without a ready pod, at most once
per diagnosis interval. Deletion needs no handler and no finalizer: everything carries an owner
reference, and the garbage collector removes it with the InferenceModel.

Status changes arrive as DaemonSet watch events; a burst of them costs one sync per InferenceModel. A
periodic resync re-runs every sync to refresh what has no event of its own (pod failure reasons).

What each variant really runs on is asked of its runtime (`GET /v2/models/<name>` through the API server's
pod proxy, on one ready pod), in the background so that no sync waits for a runtime: once per rollout state
of the variant (its DaemonSet, generation, rendered content and node count), so O(variants) calls, not
O(nodes).

Rollouts are the operator's (status/rollout.py): the DaemonSets are OnDelete, and each sync deletes the old
pods that the current wave replaces, on reachable nodes. A variant's pods are listed only while it has old
pods on reachable nodes, offline nodes or a wave to watch, and again only when its DaemonSet's counts or its
offline nodes change (or, while a pod is not ready, after a diagnosis interval).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

import kopf
from pydantic import ValidationError

from edgeloop.api import GROUP, VERSION
from edgeloop.api.inferencemodel import INFERENCE_MODEL, InferenceModelSpec, InferenceModelStatus, RolloutStatus
from edgeloop.certs import Usage, service_dns_names
from edgeloop.config import ConfigError, ImageNotAllowed, OperatorConfig
from edgeloop.handlers import KeyedRunner
from edgeloop.handlers.certificates import Certificates
from edgeloop.handlers.shared import ALL_NODES, StatusPublisher, kube_errors_are_temporary, now, one
from edgeloop.kube import KubeApi, KubeError, kind_of
from edgeloop.metrics import reconciles
from edgeloop.names import ACCELERATOR_LABEL, INFERENCE_MODEL_LABEL, RENDER_HASH
from edgeloop.nodes import DAEMON_SET_TOLERATIONS, counted_by_daemon_set, eligible_nodes, offline_nodes
from edgeloop.render.inferencemodel import (
    Manifests,
    Variant,
    labels,
    owner_of,
    render,
    template_hash,
    tls_secret_name,
    variants,
)
from edgeloop.status import inferencemodel as im_status
from edgeloop.status import rollout
from edgeloop.status.diagnosis import NodeProblem, is_ready, missing_pod_problems, node_of
from edgeloop.status.inferencemodel import DaemonSetState, Expected, ProvidersSample, SpecProblem, parse_providers
from edgeloop.status.rollout import ErrorRate, OfflineView, PodView, VariantFleet

log = logging.getLogger(__name__)

PLURAL = INFERENCE_MODEL.plural
IM_KIND = kind_of(f"{GROUP}/{VERSION}", INFERENCE_MODEL.kind)
DAEMON_SET = kind_of("apps/v1", "DaemonSet")
SERVICE = kind_of("v1", "Service")
POD = kind_of("v1", "Pod")
EVENT = kind_of("v1", "Event")
OWNED = {INFERENCE_MODEL_LABEL: kopf.PRESENT}

Key = tuple[str, str]  # (namespace, name) of an InferenceModel


@dataclass(frozen=True)
class ServiceState:
    name: str
    uid: str
    render_hash: str


@dataclass(frozen=True)
class Plan:
    """What an InferenceModel's current generation renders to, or why it cannot be rendered."""

    spec: InferenceModelSpec
    variants: list[Variant] = field(default_factory=list)
    manifests: Manifests | None = None
    problem: SpecProblem | None = None

    @property
    def expected(self) -> list[Expected]:
        if self.manifests is None:
            return []
        return [
            Expected(
                accelerator=v.name,
                daemon_set=v.daemon_set,
                render_hash=_render_hash(self.manifests.daemon_sets[v.daemon_set]),
                execution_providers=tuple(v.accelerator.execution_providers),
                template=template_hash(self.manifests.daemon_sets[v.daemon_set]),
            )
            for v in self.variants
        ]

    @property
    def revision(self) -> str:
        """What a rollout rolls out: every variant's pod template and spec.rollout (a change of either starts
        a new rollout, which also retries a halted one)."""
        parts = [v.template for v in self.expected] + [self.spec.rollout.model_dump_json()]
        return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Diagnosis:
    """One DaemonSet that lacks ready pods: its counts and since when they stand still, when its pods were
    last looked at, and the problems found then."""

    counts: tuple[int, ...]
    since: float
    looked_at: float | None
    found: list[NodeProblem]


@dataclass(frozen=True)
class Sampled:
    """A variant's providers sample: for which state of its DaemonSet, and when to ask again after a failure."""

    state: tuple[str, int, str, int]  # uid, generation, render hash, desired nodes
    sample: ProvidersSample
    retry_at: float = 0.0
    failures: int = 0


# A failed ask is repeated at most once per diagnosis interval, backing off to this.
MAX_SAMPLE_RETRY_SECONDS = 600


@dataclass(frozen=True)
class PodSnapshot:
    """A variant's pods as last listed, and the state of its DaemonSet and offline nodes then: while that state
    stands (and, if some pod is not ready, for a diagnosis interval at most), the list stands too."""

    state: tuple[Any, ...]
    listed_at: float
    pods: tuple[PodView, ...]


def _render_hash(manifest: dict[str, Any]) -> str:
    return manifest["metadata"]["annotations"][RENDER_HASH]


class InferenceModels:
    def __init__(
        self,
        *,
        config: OperatorConfig,
        kube: KubeApi,
        models: Mapping[Key, Any],
        daemon_sets: Mapping[Key, Any],
        services: Mapping[Key, Any],
        nodes: Mapping[str, Any],
        namespaces: Mapping[str, Any],
        coalesce_seconds: float,
        diagnosis_interval: float,
        post_event: Callable[..., None] = kopf.event,
        tls: Certificates | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._config = config
        # None: the runtime Service's TLS Secret is left alone (tests of the sync by itself).
        self._tls = tls if config.tls.enabled else None
        self._kube = kube
        self._models, self._daemon_sets, self._services, self._nodes = models, daemon_sets, services, nodes
        self._namespaces = namespaces
        self._diagnosis_interval = diagnosis_interval
        self._clock = clock
        # The plan of each InferenceModel's current (uid, generation): a generation's spec never changes.
        self._plans: dict[Key, tuple[tuple[str, int], Plan]] = {}
        self._status = StatusPublisher(kube, IM_KIND, InferenceModelStatus, im_status.transitions, post_event)
        # Per InferenceModel, per DaemonSet that lacks ready pods: its progress, and its pods' problems.
        self._diagnoses: dict[Key, dict[str, Diagnosis]] = {}
        # Per InferenceModel, per DaemonSet: what its runtime said it runs on.
        self._samples: dict[Key, dict[str, Sampled]] = {}
        # Per InferenceModel, per DaemonSet: its pods, while it has old or unready pods or offline nodes.
        self._pods: dict[Key, dict[str, PodSnapshot]] = {}
        # Per InferenceModel: the new pods watched during a wave's pause (uid → restarts).
        self._watched: dict[Key, dict[str, int]] = {}
        # The asks in flight, by InferenceModel and DaemonSet: a sync never waits for a runtime's answer.
        self._asking: dict[tuple[Key, str], asyncio.Task[None]] = {}
        self.runner: KeyedRunner[Key] = KeyedRunner(self._sync_from_index, delay=coalesce_seconds)
        self._resync: asyncio.Task[None] | None = None

    # ---- entry points

    async def reconcile(self, body: dict[str, Any]) -> None:
        """From the InferenceModel's own handlers, with the body Kopf just received."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        async with self.runner.lock(key):
            await self._sync(body, fresh=True)

    def request(self, key: Key) -> None:
        """Something the InferenceModel owns changed: sync it soon."""
        self.runner.request(key)

    def start_resync(self, interval: float) -> None:
        """Re-syncs every InferenceModel this often.

        Called from a handler rather than at startup: the syncs post Kubernetes events, which Kopf allows
        in handlers and the tasks they start only."""
        if self._resync is None:
            self._resync = asyncio.create_task(self._resync_forever(interval))

    async def close(self) -> None:
        if self._resync is not None:
            self._resync.cancel()
        for task in self._asking.values():
            task.cancel()
        await self.asked()
        await self.runner.close()

    async def asked(self) -> None:
        """Waits for the runtimes being asked what they run on (each answer requests a sync of its model)."""
        await asyncio.gather(*self._asking.values(), return_exceptions=True)

    async def _resync_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for key in list(self._models):
                self.runner.request(key, delay=0)

    async def _sync_from_index(self, key: Key) -> None:
        body = one(self._models, key) if key[0] in self._namespaces else None
        if body is None:  # deleted: the garbage collector removes what it owned
            self.runner.forget(key)
            self._status.forget(key)
            for kept in (self._plans, self._diagnoses, self._samples, self._pods, self._watched):
                kept.pop(key, None)
            for (asked_key, _), task in list(self._asking.items()):
                if asked_key == key:
                    task.cancel()
            return
        await self._sync(body, fresh=False)

    # ---- the sync

    @reconciles("InferenceModel")
    async def _sync(self, body: dict[str, Any], *, fresh: bool) -> None:
        metadata = body["metadata"]
        if metadata.get("deletionTimestamp"):
            return
        key: Key = (metadata["namespace"], metadata["name"])
        generation = metadata.get("generation", 1)
        previous = self._status.previous(key, body)
        try:
            plan = self._plan(key, body, await self._ensure_tls(body))
        except ValidationError as error:
            problem = SpecProblem("InvalidSpec", f"spec does not match the operator's API: {error.errors()[0]['msg']}")
            await self._status.publish(body, previous, im_status.unreadable(previous, generation, problem, now()))
            return

        daemon_sets = {state.name: state for state in self._daemon_sets.get(key, [])}
        problem = plan.problem
        if plan.manifests is not None:
            try:
                converged = await self._converge(body, fresh, plan.manifests, daemon_sets)
            except KubeError as error:
                if not error.is_permanent:
                    raise
                problem = SpecProblem("ApplyRejected", error.message)
            else:
                if converged is None:
                    return  # the index lags behind a newer generation or a deletion; its own event follows
                daemon_sets = converged

        clock = self._clock()
        fleets = {} if problem else await self._fleets(key, plan, daemon_sets, previous.rollout, clock)
        progress = previous.rollout if problem else await self._roll(key, plan, daemon_sets, fleets, previous)
        problems = [] if problem else await self._diagnose(key, plan, daemon_sets, clock)
        samples = {} if problem else await self._sample_providers(key, plan, daemon_sets)
        status = im_status.compute(
            generation=generation,
            spec=plan.spec,
            expected=plan.expected,
            daemon_sets=daemon_sets,
            problems=problems,
            previous=previous,
            now=now(),
            spec_problem=problem,
            samples=samples,
            fleets=fleets,
            rollout=progress,
        )
        await self._status.publish(body, previous, status)

    async def _ensure_tls(self, body: dict[str, Any]) -> str:
        """The revision of the runtime Service's certificate, issued or renewed first where needed."""
        if self._tls is None:
            return ""
        metadata = body["metadata"]
        owner = owner_of(metadata["name"], metadata["namespace"], metadata["uid"])
        names = service_dns_names(owner.name, owner.namespace)
        return await self._tls.ensure(owner, tls_secret_name(owner.name), labels(owner.name), Usage.SERVER, names)

    def _plan(self, key: Key, body: dict[str, Any], tls_revision: str) -> Plan:
        metadata = body["metadata"]
        version = (metadata["uid"], metadata.get("generation", 1), tls_revision)
        cached = self._plans.get(key)
        if cached is None or cached[0] != version:
            spec = InferenceModelSpec.model_validate(body.get("spec", {}))
            owner = owner_of(metadata["name"], metadata["namespace"], metadata["uid"])
            try:
                manifests = render(owner, spec, self._config, tls_revision)
                plan = Plan(spec, variants(owner.name, spec, self._config), manifests)
            except ImageNotAllowed as error:
                plan = Plan(spec, problem=SpecProblem("ImageNotAllowed", str(error)))
            except ConfigError as error:
                plan = Plan(spec, problem=SpecProblem("UnknownAcceleratorClass", str(error)))
            cached = self._plans[key] = (version, plan)
        return cached[1]

    async def _converge(
        self,
        body: dict[str, Any],
        fresh: bool,
        manifests: Manifests,
        daemon_sets: dict[str, DaemonSetState],
    ) -> dict[str, DaemonSetState] | None:
        """Applies the objects whose content changed and deletes the variants no longer listed.

        Returns the DaemonSets as they are now, or None when the InferenceModel seen in the index is no
        longer the current one (nothing is written on its behalf then).
        """
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        service = one(self._services, (namespace, name))
        live_hashes = {ds.name: ds.render_hash for ds in daemon_sets.values()}
        if service:
            live_hashes[service.name] = service.render_hash
        changed = [m for m in manifests.all() if live_hashes.get(m["metadata"]["name"]) != _render_hash(m)]
        stale = [ds for ds in daemon_sets.values() if ds.name not in manifests.daemon_sets]
        if not changed and not stale:
            return daemon_sets
        if not fresh:
            current = await asyncio.to_thread(self._kube.get, IM_KIND, namespace, name)
            if (
                current is None
                or current["metadata"]["uid"] != metadata["uid"]
                or current["metadata"].get("generation") != metadata.get("generation")
                or current["metadata"].get("deletionTimestamp")
            ):
                return None

        result = dict(daemon_sets)
        applied = await asyncio.gather(*(asyncio.to_thread(self._kube.apply, manifest) for manifest in changed))
        for manifest, live in zip(changed, applied, strict=True):
            log.info("applied %s %s/%s", manifest["kind"], namespace, manifest["metadata"]["name"])
            if manifest["kind"] == "DaemonSet":
                result[live["metadata"]["name"]] = DaemonSetState.from_object(live)
        for ds in stale:
            await asyncio.to_thread(self._kube.delete, DAEMON_SET, namespace, ds.name, ds.uid)
            log.info("deleted DaemonSet %s/%s: its class is no longer listed", namespace, ds.name)
            del result[ds.name]
        return result

    # ---- the rollout: offline nodes, pods, and the old pods each wave replaces

    async def _fleets(
        self,
        key: Key,
        plan: Plan,
        daemon_sets: dict[str, DaemonSetState],
        progress: RolloutStatus | None,
        clock: float,
    ) -> dict[str, VariantFleet]:
        """Each variant's offline nodes (from the nodes index) and, while it has old pods on reachable nodes,
        offline nodes, or unready pods with waves still to come, its pods: listed again when its DaemonSet's
        counts or its offline nodes change, or, while some pod is not ready, after a diagnosis interval (a new
        pod that fails may move no count). A burst of new models lists no pod: they have no old ones."""
        assert plan.manifests is not None
        waves_to_come = (
            progress is not None
            and progress.revision == plan.revision
            and progress.state in ("RollingOut", "Paused")
            and progress.wave < progress.waves
        )
        nodes = list(self._nodes.get(ALL_NODES, []))
        not_ready = {node.name for node in nodes if not node.ready}
        previous, current = self._pods.get(key, {}), {}
        fleets = {}
        for variant, expected in zip(plan.variants, plan.expected, strict=True):
            pod_spec = plan.manifests.daemon_sets[variant.daemon_set]["spec"]["template"]["spec"]
            tolerations = [*pod_spec.get("tolerations", []), *DAEMON_SET_TOLERATIONS]
            offline = tuple(
                OfflineView(node.name, node.unreachable, node.ready_since, counted_by_daemon_set(node, tolerations))
                for node in offline_nodes(
                    nodes, variant.node_selector_terms, plan.spec.placement.node_selector, tolerations
                )
            )
            ds = daemon_sets.get(variant.daemon_set)
            pods: tuple[PodView, ...] | None = None
            if ds is not None and (offline or ds.scheduled > ds.updated or (waves_to_come and not ds.complete)):
                state = (ds.counts, ds.render_hash, tuple(node.node for node in offline))
                snapshot = previous.get(variant.daemon_set)
                if (
                    snapshot is None
                    or snapshot.state != state
                    or (not ds.complete and clock - snapshot.listed_at >= self._diagnosis_interval)
                ):
                    listed = await asyncio.to_thread(self._list_pods, key, variant, not_ready)
                    snapshot = PodSnapshot(state, clock, listed)
                current[variant.daemon_set] = snapshot
                pods = snapshot.pods
            fleets[variant.daemon_set] = VariantFleet(
                accelerator=variant.name,
                daemon_set=variant.daemon_set,
                template=expected.template,
                desired=ds.desired if ds else 0,
                ready=ds.ready if ds else 0,
                complete=ds is not None and ds.complete,
                pods=pods,
                offline=offline,
            )
        self._pods[key] = current
        return fleets

    def _list_pods(self, key: Key, variant: Variant, not_ready: set[str]) -> tuple[PodView, ...]:
        namespace, name = key
        selector = f"{INFERENCE_MODEL_LABEL}={name},{ACCELERATOR_LABEL}={variant.name}"
        views = (
            PodView.from_object(pod, variant.name, not_ready)
            for pod in self._kube.list(POD, namespace, label_selector=selector)
        )
        return tuple(view for view in views if view is not None)

    async def _roll(
        self,
        key: Key,
        plan: Plan,
        daemon_sets: dict[str, DaemonSetState],
        fleets: dict[str, VariantFleet],
        previous: InferenceModelStatus,
    ) -> RolloutStatus | None:
        """One step of the rollout (status/rollout.py): deletes the old pods it replaces now, and asks for a
        sync when a wave's pause ends. Only once every DaemonSet is applied and its controller has caught up."""
        live = [daemon_sets.get(v.daemon_set) for v in plan.expected]
        if not all(
            ds and ds.settled and ds.render_hash == v.render_hash for ds, v in zip(live, plan.expected, strict=True)
        ):
            return previous.rollout
        inputs = {
            "revision": plan.revision,
            "rollout": plan.spec.rollout,
            "fleets": [fleets[v.daemon_set] for v in plan.variants],
            "previous": previous.rollout,
            "watch": self._watched.get(key, {}),
            "now": now(),
        }
        step = rollout.step(**inputs)
        if step.sample:
            rate = await asyncio.to_thread(self._error_rate, key, plan, step.sample)
            step = rollout.step(**inputs, error_rate=rate)
        self._watched[key] = dict(step.watch)
        if step.delete:
            await self._replace(key, step.delete)
        if step.wake_in is not None:
            self.runner.request(key, delay=step.wake_in)
        elif step.status.state in ("RollingOut", "Paused") and any(not f.complete and f.pods for f in fleets.values()):
            # New pods that fail may move no count of their DaemonSet: look again after an interval.
            self.runner.request(key, delay=self._diagnosis_interval)
        return step.status

    async def _replace(self, key: Key, pods: tuple[PodView, ...]) -> None:
        """Deletes old pods (the DaemonSet controller makes their successors), and remembers them as leaving
        until the next list, so that a sync before it does not count them as available."""
        namespace, name = key
        for pod in pods:
            await asyncio.to_thread(self._kube.delete, POD, namespace, pod.name, pod.uid)
            log.info("%s/%s: replacing pod %s on node %s", namespace, name, pod.name, pod.node)
        leaving = {pod.uid for pod in pods}
        for ds, snapshot in self._pods.get(key, {}).items():
            marked = tuple(replace(p, deleting=True) if p.uid in leaving else p for p in snapshot.pods)
            self._pods[key][ds] = replace(snapshot, pods=marked)

    def _error_rate(self, key: Key, plan: Plan, pods: tuple[PodView, ...]) -> ErrorRate:
        """What the runtimes of `pods` answered so far: their Prometheus metrics, through the pod proxy."""
        namespace, name = key
        requests = errors = 0
        asked = []
        for pod in pods:
            try:
                text = self._kube.proxy_get(
                    namespace, pod.name, plan.spec.serving.http_port, "/metrics", https=self._config.tls.enabled
                )
            except KubeError as error:
                log.warning("%s/%s: could not read the metrics of pod %s: %s", namespace, name, pod.name, error)
                continue
            answered, failed = rollout.request_counts(text)
            requests, errors = requests + answered, errors + failed
            asked.append(pod.name)
        return ErrorRate(requests, errors, tuple(asked))

    # ---- diagnosis: why nodes do not serve

    async def _diagnose(
        self, key: Key, plan: Plan, daemon_sets: dict[str, DaemonSetState], clock: float
    ) -> list[NodeProblem]:
        """Looks at the pods of the variants whose rollout has stalled.

        A DaemonSet with nodes that lack a ready pod, whose counts have not moved for a diagnosis interval,
        has its pods looked at, and again at most once per interval. While the counts move, the rollout is
        progressing: listing its pods would tell little, and in a burst of new models hundreds of lists
        would cost the API server what it needs to start the pods. A stall not looked at yet asks for a
        sync when it is an interval old, so it is found without waiting for the resync.
        """
        previous = self._diagnoses.get(key, {})
        current: dict[str, Diagnosis] = {}
        interval = self._diagnosis_interval
        wake_in: float | None = None
        for variant in plan.variants:
            state = daemon_sets.get(variant.daemon_set)
            if state is None or not state.needs_diagnosis:
                continue
            last = previous.get(variant.daemon_set)
            since = last.since if last and last.counts == state.counts else clock
            looked_at, found = (last.looked_at, last.found) if last else (None, [])
            if clock - since >= interval and (looked_at is None or clock - looked_at >= interval):
                fresh = self._pods.get(key, {}).get(variant.daemon_set)
                pods = fresh.pods if fresh is not None and fresh.listed_at == clock else None
                found = await asyncio.to_thread(self._diagnose_variant, key, plan, variant, state, pods)
                looked_at = clock
            elif looked_at is None or looked_at < since:
                due = since + interval - clock
                wake_in = due if wake_in is None else min(wake_in, due)
            current[variant.daemon_set] = Diagnosis(state.counts, since, looked_at, found)
        self._diagnoses[key] = current
        if wake_in is not None:
            self.runner.request(key, delay=wake_in)
        return [problem for diagnosis in current.values() for problem in diagnosis.found]

    def _diagnose_variant(
        self, key: Key, plan: Plan, variant: Variant, state: DaemonSetState, pods: tuple[PodView, ...] | None
    ) -> list[NodeProblem]:
        """`pods`: the variant's pods if this sync listed them already."""
        namespace = key[0]
        nodes = list(self._nodes.get(ALL_NODES, []))
        if pods is None:
            pods = self._list_pods(key, variant, {node.name for node in nodes if not node.ready})
        problems = [pod.problem for pod in pods if pod.problem is not None]
        with_pods = {pod.node for pod in pods}
        if state.scheduled < state.desired:
            # A pod the DaemonSet controller cannot create leaves no pod behind, only the controller's events.
            refusals = list(
                self._kube.list(EVENT, namespace, field_selector=f"involvedObject.uid={state.uid},reason=FailedCreate")
            )
            if refusals:
                latest = max(refusals, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
                assert plan.manifests is not None
                pod_spec = plan.manifests.daemon_sets[variant.daemon_set]["spec"]["template"]["spec"]
                eligible = eligible_nodes(
                    nodes, variant.node_selector_terms, plan.spec.placement.node_selector,
                    pod_spec.get("tolerations", []),
                )
                problems += missing_pod_problems(eligible, with_pods, variant.name, latest.get("message", ""))
        return problems


    # ---- what the runtimes really run on

    async def _sample_providers(
        self, key: Key, plan: Plan, daemon_sets: dict[str, DaemonSetState]
    ) -> dict[str, ProvidersSample]:
        """What each variant's runtime said it runs on. A variant whose pods are all of the current version,
        and whose answer for that state of its DaemonSet is not known yet, has one ready pod asked in the
        background (the answer requests a sync); meanwhile, as during a rollout, the last answer stands."""
        known = self._samples.setdefault(key, {})
        for stale in set(known) - {v.daemon_set for v in plan.variants}:
            del known[stale]
        clock = self._clock()
        for variant in plan.variants:
            ds, last = daemon_sets.get(variant.daemon_set), known.get(variant.daemon_set)
            if ds is None or (key, variant.daemon_set) in self._asking:
                continue
            state = (ds.uid, ds.generation, ds.render_hash, ds.desired)
            askable = ds.settled and ds.ready > 0 and ds.updated >= ds.desired
            answered = last is not None and last.state == state and (not last.sample.error or clock < last.retry_at)
            if askable and not answered:
                task = asyncio.create_task(self._ask(key, plan, variant, state, last))
                self._asking[(key, variant.daemon_set)] = task
        return {name: sampled.sample for name, sampled in known.items()}

    async def _ask(
        self, key: Key, plan: Plan, variant: Variant, state: tuple[str, int, str, int], last: Sampled | None
    ) -> None:
        try:
            sample = await asyncio.to_thread(self._ask_runtime, key, plan, variant)
            failures = (last.failures if last and last.sample.error else 0) + 1 if sample.error else 0
            backoff = min(self._diagnosis_interval * 2 ** max(failures - 1, 0), MAX_SAMPLE_RETRY_SECONDS)
            if sample.error:
                log.info(
                    "%s/%s: could not ask the %s variant's runtime what it runs on (%d in a row; again in %.0f s): %s",
                    *key, variant.name, failures, backoff, sample.error,
                )
            if key in self._samples:  # not forgotten meanwhile
                self._samples[key][variant.daemon_set] = Sampled(state, sample, self._clock() + backoff, failures)
                self.runner.request(key)
        finally:
            self._asking.pop((key, variant.daemon_set), None)

    def _ask_runtime(self, key: Key, plan: Plan, variant: Variant) -> ProvidersSample:
        """GET /v2/models/<name> of one ready pod of the variant, through the API server (C2)."""
        namespace, name = key
        selector = f"{INFERENCE_MODEL_LABEL}={name},{ACCELERATOR_LABEL}={variant.name}"
        running = self._kube.list(POD, namespace, label_selector=selector, field_selector="status.phase=Running",
                                  page_size=20)
        pod = next((p for p in itertools.islice(running, 20) if is_ready(p)), None)
        if pod is None:
            return ProvidersSample(error="no ready pod found")
        pod_name, node = pod["metadata"]["name"], node_of(pod) or ""
        path = f"/v2/models/{quote(name, safe='')}"
        try:
            answer = self._kube.proxy_get(
                namespace, pod_name, plan.spec.serving.http_port, path, https=self._config.tls.enabled
            )
            return ProvidersSample(node=node, providers=parse_providers(answer))
        except (KubeError, ValueError) as error:
            return ProvidersSample(node=node, error=f"GET {path} of pod {pod_name}: {error}"[:300])


# ---- Kopf registration (the one startup that builds the controller is in handlers/operator.py)


@kopf.index(GROUP, VERSION, PLURAL)
def inference_models(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, name): dict(body)}


@kopf.index("apps", "v1", "daemonsets", labels=OWNED)
def inference_model_daemon_sets(
    namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, DaemonSetState]:
    return {(namespace, labels[INFERENCE_MODEL_LABEL]): DaemonSetState.from_object(body)}


@kopf.index("", "v1", "services", labels=OWNED)
def inference_model_services(
    namespace: str, name: str, uid: str, labels: kopf.Labels, annotations: kopf.Annotations, **_: Any
) -> dict[Key, ServiceState]:
    return {(namespace, labels[INFERENCE_MODEL_LABEL]): ServiceState(name, uid, annotations.get(RENDER_HASH, ""))}


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@kube_errors_are_temporary
async def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.inference_models.start_resync(memo.resync_seconds)
    await memo.inference_models.reconcile(dict(body))


@kopf.on.event("apps", "v1", "daemonsets", labels=OWNED)
@kopf.on.event("", "v1", "services", labels=OWNED)
async def owned_object_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    memo.inference_models.request((namespace, labels[INFERENCE_MODEL_LABEL]))


def watch_tls_secrets() -> None:
    """A model's certificate replaced or removed by someone else: sync the model (with TLS only)."""
    kopf.on.event("", "v1", "secrets", labels=OWNED)(owned_object_changed)
