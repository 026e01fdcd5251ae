"""FederatedRound handlers: Kopf glue around one `sync` that starts a round, follows it and promotes it.

A round starts once: the participants are selected from the nodes (a Kopf index), the starting model is
resolved, and the aggregator Job is created first, carrying those decisions, then its Service and one
client Job per node. Later syncs render from the aggregator Job's record and create only what is missing.

The round's progress has no watch event: the aggregator reports it as JSON at `GET /v1/status` (polled
through its Service every few seconds while the round runs) and as the last line of its log when it is
done (read once its Job has finished, should the operator have missed the last poll). The status is a
pure function of that report and the aggregator Job (edgeloop.status.federatedround). When the report
says Succeeded, the promotion gate decides, and a model that passes replaces the InferenceModel's
spec.model, which rolls the fleet. A round whose outcome and promotion are decided is never looked at again.

TLS (unless tls.mode is disabled): before its Jobs, a round gets a server certificate for its aggregator
Service and a client certificate per client Job (mTLS), whose subject CN, the client's node, is its id at
the aggregator, from the Certificates of handlers/certificates.py, so every sync of a running round is also
their rotation check. The operator reads the aggregator's status (edgeloop.aggregator) with a client
certificate of its own, read from the watch of the TLS Secrets.

Stuck pods are seen within seconds, not at the deadline: the operator watches the round's pods (a Kopf index of
what it needs of them) and reports the first one that cannot start or keeps failing as Degraded, with its own
message; for a pod that waits for its volumes, the kubelet's FailedMount event says why.

Deletion needs no handler: everything carries an owner reference, and the garbage collector removes the
Jobs (stopping their pods), the Service and the TLS Secrets with the FederatedRound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from edgeloop.aggregator import AggregatorUnreachable, ClientTLS, read_report
from edgeloop.api import API_VERSION, GROUP, VERSION
from edgeloop.api.common import ModelRef, ModelSource
from edgeloop.api.federatedround import FEDERATED_ROUND, FederatedRoundSpec, FederatedRoundStatus
from edgeloop.certs import Usage, service_dns_names
from edgeloop.config import ImageNotAllowed, OperatorConfig
from edgeloop.handlers import KeyedRunner
from edgeloop.handlers.certificates import Certificates
from edgeloop.handlers.shared import ALL_NODES, StatusPublisher, kube_errors_are_temporary, now, one
from edgeloop.kube import KubeApi, KubeError, kind_of
from edgeloop.metrics import reconciles
from edgeloop.names import AGGREGATOR_CONTAINER, AGGREGATOR_ROLE, ROLE_LABEL, ROUND_LABEL, START_ANNOTATION
from edgeloop.nodes import select, shortfall_message
from edgeloop.render import Owner
from edgeloop.render.federatedround import (
    AGGREGATOR_PORT,
    STATUS_CLIENT,
    DatasetOutsideRoot,
    Start,
    aggregator_host,
    aggregator_name,
    aggregator_tls_secret,
    client_tls_secret,
    dataset_path,
    image,
    labels,
    owner_of,
    render,
    status_tls_secret,
)
from edgeloop.status import federatedround as fr_status
from edgeloop.status.diagnosis import RoundPod
from edgeloop.status.federatedround import AggregatorReport, JobState, Promotion, Waiting, parse_report

log = logging.getLogger(__name__)

PLURAL = FEDERATED_ROUND.plural
FR_KIND = kind_of(API_VERSION, FEDERATED_ROUND.kind)
IM_KIND = kind_of(API_VERSION, "InferenceModel")
JOB = kind_of("batch/v1", "Job")
POD = kind_of("v1", "Pod")
EVENT = kind_of("v1", "Event")
OWNED = {ROUND_LABEL: kopf.PRESENT}
# A pod waiting this long for its containers to be created is asked why (the kubelet's FailedMount events).
MOUNT_GRACE_SECONDS = 5
MAX_PODS_ASKED = 3

Key = tuple[str, str]  # (namespace, name) of a FederatedRound


class FederatedRounds:
    def __init__(
        self,
        *,
        config: OperatorConfig,
        kube: KubeApi,
        rounds: Mapping[Key, Any],
        jobs: Mapping[Key, Any],
        services: Mapping[Key, Any],
        nodes: Mapping[str, Any],
        pods: Mapping[Key, Any],
        namespaces: Mapping[str, Any],
        coalesce_seconds: float,
        read_report: Callable[[str, ClientTLS | None], AggregatorReport] = read_report,
        post_event: Callable[..., None] = kopf.event,
        tls: Certificates | None = None,
    ):
        self._config = config
        self._kube = kube
        # None: no certificates are issued (tls.mode disabled, or tests of the sync by itself).
        self._tls = tls if config.tls.enabled else None
        self._rounds, self._jobs, self._services, self._nodes = rounds, jobs, services, nodes
        self._pods = pods
        self._namespaces = namespaces
        self._read_report = read_report
        self._post_event = post_event
        self._status = StatusPublisher(kube, FR_KIND, FederatedRoundStatus, fr_status.transitions, post_event)
        # Rounds waiting for nodes: synced again when a node changes.
        self._waiting_for_nodes: set[Key] = set()
        self._polling: asyncio.Task[None] | None = None
        self.runner: KeyedRunner[Key] = KeyedRunner(self._sync_from_index, delay=coalesce_seconds)

    # ---- entry points

    async def reconcile(self, body: dict[str, Any]) -> None:
        """From the FederatedRound's own handlers, with the body Kopf just received."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        async with self.runner.lock(key):
            await self._sync(body)

    def request(self, key: Key) -> None:
        self.runner.request(key)

    def nodes_changed(self) -> None:
        for key in self._waiting_for_nodes:
            self.runner.request(key)

    def start_polling(self, interval: float) -> None:
        """Syncs every round in progress this often: its aggregator's report has no watch event.

        Called from a handler rather than at startup: the syncs post Kubernetes events, which Kopf allows
        in handlers and the tasks they start only."""
        if self._polling is None:
            self._polling = asyncio.create_task(self._poll_forever(interval))

    async def _poll_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for key, bodies in list(self._rounds.items()):
                body = next(iter(bodies), None) if key[0] in self._namespaces else None
                if body is not None and not fr_status.is_done(self._status.latest(key, body)):
                    self.runner.request(key, delay=0)

    async def close(self) -> None:
        if self._polling is not None:
            self._polling.cancel()
        await self.runner.close()

    async def _sync_from_index(self, key: Key) -> None:
        body = one(self._rounds, key) if key[0] in self._namespaces else None
        if body is None:  # deleted: the garbage collector removes what it owned
            self.runner.forget(key)
            self._status.forget(key)
            self._waiting_for_nodes.discard(key)
            return
        await self._sync(body)

    # ---- the sync

    @reconciles("FederatedRound")
    async def _sync(self, body: dict[str, Any]) -> None:
        metadata = body["metadata"]
        if metadata.get("deletionTimestamp"):
            return
        key: Key = (metadata["namespace"], metadata["name"])
        generation = metadata.get("generation", 1)
        previous = self._status.previous(key, body)
        if fr_status.is_done(previous):
            return
        self._waiting_for_nodes.discard(key)
        try:
            spec = FederatedRoundSpec.model_validate(body.get("spec", {}))
        except ValidationError as error:
            waiting = Waiting("InvalidSpec", f"spec does not match the operator's API: {error.errors()[0]['msg']}")
            status = fr_status.pending(
                generation=generation, rounds=previous.rounds, waiting=waiting, previous=previous, now=now()
            )
            await self._status.publish(body, previous, status)
            return

        try:
            dataset_path(spec, self._config, metadata["namespace"])
            image(spec, self._config)
        except (DatasetOutsideRoot, ImageNotAllowed) as error:
            why = Waiting(type(error).__name__, str(error))
            status = fr_status.cannot_run(
                generation=generation, rounds=spec.training.rounds, why=why, previous=previous, now=now()
            )
            await self._status.publish(body, previous, status)
            return

        owner = owner_of(metadata["name"], metadata["namespace"], metadata["uid"])
        jobs = {job.name: job for job in self._jobs.get(key, []) if job.owner_uid == owner.uid}
        aggregator = jobs.get(aggregator_name(owner.name))
        if aggregator is None:
            started = await self._start(owner, spec, previous)
            if started is None:
                await self._status.publish(body, previous, fr_status.aggregator_deleted(previous, generation, now()))
                return
            if isinstance(started, Waiting):
                if started.reason == "NotEnoughNodes":
                    self._waiting_for_nodes.add(key)
                decided = {"generation": generation, "rounds": spec.training.rounds, "previous": previous, "now": now()}
                status = (
                    fr_status.cannot_run(why=started, **decided)
                    if started.final
                    else fr_status.pending(waiting=started, **decided)
                )
                await self._status.publish(body, previous, status)
                return
            aggregator = started
        else:
            start = Start.from_annotation(aggregator.annotations[START_ANNOTATION])
            await self._ensure_tls(owner, start)  # every sync of a running round: the rotation check
            await self._create_missing(owner, spec, aggregator, jobs)

        start = Start.from_annotation(aggregator.annotations[START_ANNOTATION])
        degraded = await self._stuck(key, {aggregator.uid, *(job.uid for job in jobs.values())})
        report, report_error = await self._report(owner, aggregator)
        promotion = None
        if report is not None and report.phase == "Succeeded":
            promotion = fr_status.gate(spec.promote, spec.model_ref is not None, report)
            promotion = promotion or await self._promote(owner, spec, start, report)
        status = fr_status.compute(
            generation=generation,
            spec=spec,
            round_name=owner.name,
            nodes=start.nodes,
            base_model=ModelRef(sha256=start.model.sha256, version=start.model.version),
            aggregator=aggregator,
            report=report,
            report_error=report_error,
            promotion=promotion,
            previous=previous,
            now=now(),
            degraded=degraded,
        )
        await self._status.publish(body, previous, status)

    async def _stuck(self, key: Key, job_uids: set[str]) -> fr_status.ConditionUpdate:
        """Degraded from the round's pods, as the watch shows them."""
        pods = [pod for pod in self._pods.get(key, []) if pod.job_uid in job_uids]
        waiting = [pod for pod in pods if pod.creating_since and _age(pod.creating_since) >= MOUNT_GRACE_SECONDS]
        failures = await asyncio.to_thread(self._mount_failures, key[0], waiting[:MAX_PODS_ASKED])
        return fr_status.stuck(pods, failures)

    def _mount_failures(self, namespace: str, pods: Sequence[RoundPod]) -> dict[str, str]:
        """By pod uid, the kubelet's latest FailedMount message for pods that wait for their volumes."""
        found = {}
        for pod in pods:
            events = list(self._kube.list(EVENT, namespace, field_selector=f"involvedObject.uid={pod.uid},"
                                                                             "reason=FailedMount"))
            if events:
                latest = max(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
                found[pod.uid] = latest.get("message", "")[:300]
        return found

    # ---- starting

    async def _start(
        self, owner: Owner, spec: FederatedRoundSpec, previous: FederatedRoundStatus
    ) -> JobState | Waiting | None:
        """For a round whose aggregator Job is not in the index: selects the nodes, resolves the starting
        model and creates the round's objects, aggregator Job first; or says why the round cannot start
        yet. None: the round had started, and its aggregator Job has been deleted since."""
        if previous.phase == "Pending":  # waiting costs no API call
            selection = select(self._nodes.get(ALL_NODES, []), spec.participants)
            if not selection.enough:
                return Waiting("NotEnoughNodes", shortfall_message(selection, spec.participants))
            resolved = await self._starting_model(owner, spec)
            if isinstance(resolved, Waiting):
                return resolved
        # A round started moments ago may not be in the index yet.
        existing = await asyncio.to_thread(self._kube.get, JOB, owner.namespace, aggregator_name(owner.name))
        if existing is not None:
            job = JobState.from_object(existing)
            if job.owner_uid != owner.uid:
                return Waiting(
                    "PreviousRoundNotGone", f"Job {job.name} of an earlier FederatedRound {owner.name} is being deleted"
                )
            await self._ensure_tls(owner, Start.from_annotation(job.annotations[START_ANNOTATION]))
            await self._create_missing(owner, spec, job, {job.name: job})
            return job
        if previous.phase != "Pending":
            return None  # it had started, and its record is gone

        model, serving_sha256 = resolved
        start = Start(tuple(selection.nodes), model, serving_sha256)
        manifests = render(owner, spec, self._config, start)
        await self._ensure_tls(owner, start)  # before the Jobs that mount the certificates
        created = [await asyncio.to_thread(self._kube.apply, manifest) for manifest in manifests.all()]
        log.info("%s/%s: started on %s", owner.namespace, owner.name, ", ".join(start.nodes))
        return JobState.from_object(created[0])

    async def _ensure_tls(self, owner: Owner, start: Start) -> None:
        """The aggregator's server certificate, the operator's client certificate for its status, and one
        client certificate per client (CN: its node), issued or renewed where needed (no API call while they
        are valid)."""
        if self._tls is None:
            return
        service = aggregator_name(owner.name)
        dns_names = service_dns_names(service, owner.namespace)
        secret_labels = labels(owner.name)
        await self._tls.ensure(owner, aggregator_tls_secret(owner.name), secret_labels, Usage.SERVER, dns_names)
        await self._tls.ensure(owner, status_tls_secret(owner.name), secret_labels, Usage.CLIENT, [], STATUS_CLIENT)
        for index, node in enumerate(start.nodes):
            await self._tls.ensure(owner, client_tls_secret(owner.name, index), secret_labels, Usage.CLIENT, [], node)

    def _client_tls(self, owner: Owner, url: str) -> ClientTLS | None:
        """The operator's client certificate for an https:// status URL (the aggregator requires one)."""
        if self._tls is None or not url.startswith("https://"):
            return None
        stored = self._tls.stored(owner.namespace, status_tls_secret(owner.name))
        if stored is None:
            return None  # not issued yet (cert-manager); the poll fails and says why
        return ClientTLS(stored.ca, stored.cert, stored.key, aggregator_host(owner))

    async def _starting_model(self, owner: Owner, spec: FederatedRoundSpec) -> tuple[ModelSource, str | None] | Waiting:
        """The model to start from, and the digest modelRef's InferenceModel serves (None without one)."""
        if spec.model_ref is None:
            assert spec.model is not None  # admission requires one of them
            return spec.model, None
        target = await asyncio.to_thread(self._kube.get, IM_KIND, owner.namespace, spec.model_ref.name)
        if target is None:
            return Waiting("InferenceModelNotFound", f"InferenceModel {spec.model_ref.name} does not exist")
        serving = ModelSource.model_validate(target["spec"]["model"])
        model = spec.model or serving
        if model.format != "onnx":
            return Waiting(
                "UnsupportedModelFormat",
                f"InferenceModel {spec.model_ref.name} serves a {model.format} model; federated training needs an "
                "onnx model (give the round an onnx model to start from)",
                final=True,
            )
        return model, serving.sha256

    async def _create_missing(
        self, owner: Owner, spec: FederatedRoundSpec, aggregator: JobState, jobs: dict[str, JobState]
    ) -> None:
        """Recreates what is missing from a started round (a crash between creations, a Job deleted by
        hand), from the aggregator Job's record. Existing Jobs are left alone: a Job's pods are immutable."""
        key = (owner.namespace, owner.name)
        have = {("Job", name) for name in jobs} | {
            ("Service", name) for name, uid in self._services.get(key, []) if uid == owner.uid
        }
        start = Start.from_annotation(aggregator.annotations[START_ANNOTATION])
        for manifest in render(owner, spec, self._config, start).all():
            if (manifest["kind"], manifest["metadata"]["name"]) not in have:
                await asyncio.to_thread(self._kube.apply, manifest)
                log.info("%s/%s: created %s %s", *key, manifest["kind"], manifest["metadata"]["name"])

    # ---- following

    async def _report(self, owner: Owner, aggregator: JobState) -> tuple[AggregatorReport | None, str]:
        """The aggregator's latest report, or None and why none could be read."""
        url = self._config.status_url_template().format(
            service=aggregator_name(owner.name), namespace=owner.namespace, port=AGGREGATOR_PORT
        )
        try:
            return await asyncio.to_thread(self._read_report, url, self._client_tls(owner, url)), ""
        except AggregatorUnreachable as error:
            unreachable = str(error)
        if not aggregator.finished:
            return None, unreachable
        try:
            return await asyncio.to_thread(self._last_logged_report, owner, aggregator), ""
        except (KubeError, LookupError, ValueError) as error:
            return None, f"{unreachable}; its log: {error}"

    def _last_logged_report(self, owner: Owner, aggregator: JobState) -> AggregatorReport:
        """The aggregator prints its final report as the last line of its log."""
        selector = f"{ROUND_LABEL}={owner.name},{ROLE_LABEL}={AGGREGATOR_ROLE}"
        pods = [
            pod
            for pod in self._kube.list(POD, owner.namespace, label_selector=selector)
            if any(o.get("uid") == aggregator.uid for o in pod["metadata"].get("ownerReferences", []))
        ]
        if not pods:
            raise LookupError("no pod of the aggregator Job is left")
        latest = max(pods, key=lambda pod: pod["metadata"]["creationTimestamp"])
        lines = self._kube.log_tail(owner.namespace, latest["metadata"]["name"], AGGREGATOR_CONTAINER, 1).splitlines()
        return parse_report(lines[-1] if lines else "")

    # ---- promoting

    async def _promote(
        self, owner: Owner, spec: FederatedRoundSpec, start: Start, report: AggregatorReport
    ) -> Promotion:
        """Points modelRef's InferenceModel at the trained model, unless it moved on since the round started."""
        assert spec.model_ref is not None and report.result is not None  # the gate passed
        name = spec.model_ref.name
        version = fr_status.promoted_version(spec.promote, start.model.version, owner.name)
        target = await asyncio.to_thread(self._kube.get, IM_KIND, owner.namespace, name)
        serving = target["spec"]["model"] if target else None
        promotion = fr_status.promotion(name, serving, start.serving_sha256, report.result, version)
        if promotion.write is None:
            return promotion
        assert target is not None
        # Conditional on the version read: a change in between answers 409, and the sync is retried.
        patch = {
            "metadata": {"resourceVersion": target["metadata"]["resourceVersion"]},
            "spec": {"model": dict(promotion.write)},
        }
        try:
            await asyncio.to_thread(self._kube.merge_patch, IM_KIND, owner.namespace, name, patch)
        except KubeError as error:
            if not error.is_permanent:
                raise
            return Promotion(False, "PromotionRejected", error.message)
        log.info("%s/%s: promoted into %s: version %s", owner.namespace, owner.name, name, version)
        self._post_event(
            target,
            type="Normal",
            reason="Promoted",
            message=f"version {version} from FederatedRound {owner.name} (accuracy {report.metrics.accuracy:.4f})",
        )
        return promotion


def _age(timestamp: str) -> float:
    """Seconds since an RFC 3339 time."""
    return (datetime.now(UTC) - datetime.fromisoformat(timestamp.replace("Z", "+00:00"))).total_seconds()


# ---- Kopf registration (the one startup that builds the controller is in handlers/operator.py)


@kopf.index(GROUP, VERSION, PLURAL)
def federated_rounds(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, name): dict(body)}


@kopf.index("batch", "v1", "jobs", labels=OWNED)
def federated_round_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, JobState]:
    return {(namespace, labels[ROUND_LABEL]): JobState.from_object(body)}


@kopf.index("", "v1", "pods", labels=OWNED)
def federated_round_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, RoundPod]:
    return {(namespace, labels[ROUND_LABEL]): RoundPod.from_object(body)}


@kopf.index("", "v1", "services", labels=OWNED)
def federated_round_services(
    namespace: str, name: str, labels: kopf.Labels, meta: kopf.Meta, **_: Any
) -> dict[Key, tuple[str, str]]:
    owner = next((o.get("uid", "") for o in meta.get("ownerReferences", []) if o.get("controller")), "")
    return {(namespace, labels[ROUND_LABEL]): (name, owner)}


# The spec is immutable (admission enforces it), so there is no update handler.
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kube_errors_are_temporary
async def reconcile_federated_round(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.federated_rounds.start_polling(memo.federated_poll_seconds)
    await memo.federated_rounds.reconcile(dict(body))


@kopf.on.event("batch", "v1", "jobs", labels=OWNED)
@kopf.on.event("", "v1", "services", labels=OWNED)
@kopf.on.event("", "v1", "pods", labels=OWNED)
async def federated_round_object_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    memo.federated_rounds.request((namespace, labels[ROUND_LABEL]))


@kopf.on.event("", "v1", "nodes")
async def node_changed_for_federated_rounds(memo: kopf.Memo, **_: Any) -> None:
    memo.federated_rounds.nodes_changed()
