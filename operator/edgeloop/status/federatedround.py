"""A FederatedRound's status from its Jobs and the aggregator's report, and the promotion gate.

The aggregator reports its status as JSON (FEDERATED.md: `GET /v1/status` while it runs, the last line of
its log when it is done); everything here is a pure function of that report, the Jobs' states and the
status written before.

Conditions (Kubernetes API conventions; reasons are CamelCase):
- Started: the round's Jobs exist. False while it waits (NotEnoughNodes, InferenceModelNotFound, ...).
- Succeeded: Unknown while training; True once the model is trained and published; False if the round failed.
- Promoted: whether the InferenceModel now serves the trained model, and if not, why not.
- Degraded: a pod of the round cannot start or keeps failing (an image that cannot be pulled, a missing
  Secret, a volume that cannot be mounted, a crash loop, no node for it), with its reason and its own message:
  seen within seconds, where the round would otherwise wait for its deadline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from edgeloop.api.common import ModelRef
from edgeloop.api.federatedround import (
    FederatedRoundSpec,
    FederatedRoundStatus,
    Metrics,
    ParticipantsStatus,
    Promote,
    Result,
)
from edgeloop.names import AGGREGATOR_ROLE
from edgeloop.status import ConditionUpdate, Event, condition, merge_conditions
from edgeloop.status.diagnosis import RoundPod

STARTED, SUCCEEDED, PROMOTED, DEGRADED = "Started", "Succeeded", "Promoted", "Degraded"
AS_EXPECTED = ConditionUpdate(DEGRADED, "False", "AsExpected", "")
TERMINAL = ("Succeeded", "Failed")
MAX_NAMES_IN_MESSAGES = 10


# ---- inputs


@dataclass(frozen=True)
class JobState:
    """What the operator reads from one of a round's Jobs."""

    name: str
    uid: str
    owner_uid: str
    finished: str  # "", "Complete" or "Failed"
    reason: str  # of the Failed condition
    message: str
    annotations: Mapping[str, str]

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> JobState:
        metadata = obj["metadata"]
        owner = next((o for o in metadata.get("ownerReferences", []) if o.get("controller")), {})
        final = next(
            (
                c
                for c in obj.get("status", {}).get("conditions", [])
                if c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            ),
            {},
        )
        return cls(
            name=metadata["name"],
            uid=metadata.get("uid", ""),
            owner_uid=owner.get("uid", ""),
            finished=final.get("type", ""),
            reason=final.get("reason", ""),
            message=final.get("message", ""),
            annotations=dict(metadata.get("annotations", {})),
        )


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class ReportParticipants(_Report):
    selected: int
    reported: int
    dropped: int


class ReportResult(_Report):
    uri: str
    sha256: str


class AggregatorReport(_Report):
    """The aggregator's status JSON (FEDERATED.md, "Status and result"); `history` is not needed here."""

    phase: Literal["Running", "Succeeded", "Failed"]
    round: int
    rounds: int
    stage: str | None = None
    participants: ReportParticipants
    metrics: Metrics | None = None
    baseline: Metrics | None = None
    result: ReportResult | None = None
    reason: str = ""

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL


def parse_report(text: str) -> AggregatorReport:
    """Raises ValueError (pydantic's ValidationError is one) when `text` is not a status report."""
    return AggregatorReport.model_validate(json.loads(text))


@dataclass(frozen=True)
class Waiting:
    """Why a round has not started; `final` when it never will (it fails)."""

    reason: str
    message: str
    final: bool = False


@dataclass(frozen=True)
class Promotion:
    """Whether the trained model was promoted, and why (not). With `write`, it is promoted once
    modelRef's spec.model is written so (a merge patch conditional on what was read)."""

    promoted: bool
    reason: str
    message: str
    write: Mapping[str, str] | None = None


# ---- the promotion gate


def improves(trained: Metrics, baseline: Metrics) -> bool:
    """Higher accuracy, or the same accuracy at a lower loss, on the same clients' holdout data."""
    return trained.accuracy > baseline.accuracy or (
        trained.accuracy == baseline.accuracy and trained.loss < baseline.loss
    )


def gate(promote: Promote, has_target: bool, report: AggregatorReport) -> Promotion | None:
    """Why a round that succeeded may not be promoted, or None when it may."""
    if not promote.enabled:
        return Promotion(False, "PromotionDisabled", "promote.enabled is false: the model is published only")
    if not has_target:
        return Promotion(False, "NoModelRef", "no modelRef to promote into: the model is published only")
    trained = report.metrics
    if report.result is None or trained is None:
        return Promotion(False, "NoResult", "the aggregator reported success without a published, evaluated model")
    if trained.accuracy < promote.min_accuracy:
        return Promotion(
            False,
            "BelowMinAccuracy",
            f"accuracy {trained.accuracy:.4f} is below minAccuracy {promote.min_accuracy:g}",
        )
    if promote.require_improvement:
        if report.baseline is None:
            return Promotion(False, "NoBaseline", "requireImprovement, but the starting model was not evaluated")
        if not improves(trained, report.baseline):
            return Promotion(
                False,
                "NotImproved",
                f"accuracy {trained.accuracy:.4f} (loss {trained.loss:.4f}) does not improve on the starting "
                f"model's {report.baseline.accuracy:.4f} (loss {report.baseline.loss:.4f})",
            )
    return None


def promotion(
    name: str, serving: Mapping[str, Any] | None, started_from: str | None, result: ReportResult, version: str
) -> Promotion:
    """What promoting `result` as `version` into InferenceModel `name` takes, given the spec.model it
    serves now (None: it is gone) and the digest it served when the round started."""
    if serving is None:
        return Promotion(False, "InferenceModelNotFound", f"InferenceModel {name} no longer exists")
    done = f"InferenceModel {name} serves version {version} (sha256 {result.sha256[:12]}…)"
    if serving.get("sha256") == result.sha256:
        return Promotion(True, "Promoted", done)  # already, e.g. just before the operator restarted
    if serving.get("sha256") != started_from:
        return Promotion(
            False,
            "InferenceModelChanged",
            f"InferenceModel {name} moved on to version {serving.get('version')} since the round started; "
            "it is left alone",
        )
    return Promotion(True, "Promoted", done, write={"uri": result.uri, "sha256": result.sha256, "version": version})


def promoted_version(promote: Promote, base_version: str, round_name: str) -> str:
    if promote.version:
        return promote.version
    if base_version.isdigit():
        return str(int(base_version) + 1)
    return f"{base_version}-{round_name}"[:63]


# ---- status


def _names(nodes: Sequence[str]) -> str:
    shown = ", ".join(nodes[:MAX_NAMES_IN_MESSAGES])
    return shown + (f" and {len(nodes) - MAX_NAMES_IN_MESSAGES} more" if len(nodes) > MAX_NAMES_IN_MESSAGES else "")


def pending(
    *, generation: int, rounds: int, waiting: Waiting, previous: FederatedRoundStatus, now: str
) -> FederatedRoundStatus:
    """A round that has not started."""
    updates = [
        ConditionUpdate(STARTED, "False", waiting.reason, waiting.message),
        ConditionUpdate(SUCCEEDED, "Unknown", "NotStarted", ""),
        ConditionUpdate(PROMOTED, "Unknown", "NotStarted", ""),
        AS_EXPECTED,
    ]
    return FederatedRoundStatus(
        observed_generation=generation,
        phase="Pending",
        rounds=rounds,
        progress=f"0/{rounds}",
        conditions=merge_conditions(previous.conditions, updates, generation, now),
    )


def aggregator_deleted(previous: FederatedRoundStatus, generation: int, now: str) -> FederatedRoundStatus:
    """A started round whose aggregator Job was deleted: its state is gone, so the round has failed."""
    updates = [
        ConditionUpdate(SUCCEEDED, "False", "AggregatorDeleted", "the aggregator Job was deleted while the round ran"),
        ConditionUpdate(PROMOTED, "False", "RoundFailed", "the round failed: there is nothing to promote"),
    ]
    kept = [_kept(previous, STARTED)] if condition(previous.conditions, STARTED) else []
    updates.append(_kept(previous, DEGRADED))
    return previous.model_copy(
        update={
            "observed_generation": generation,
            "phase": "Failed",
            "stage": "",
            "conditions": merge_conditions(previous.conditions, kept + updates, generation, now),
        }
    )


def cannot_run(
    *, generation: int, rounds: int, why: Waiting, previous: FederatedRoundStatus, now: str
) -> FederatedRoundStatus:
    """A round that can never run as specified (its spec is immutable): it fails, with why."""
    started = condition(previous.conditions, STARTED)
    updates = [
        ConditionUpdate(STARTED, started.status, started.reason, started.message)
        if started and started.status == "True"
        else ConditionUpdate(STARTED, "False", why.reason, why.message),
        ConditionUpdate(SUCCEEDED, "False", why.reason, why.message),
        ConditionUpdate(PROMOTED, "False", "RoundFailed", "the round failed: there is nothing to promote"),
        _kept(previous, DEGRADED),
    ]
    return previous.model_copy(
        update={
            "observed_generation": generation,
            "phase": "Failed",
            "rounds": previous.rounds or rounds,
            "progress": previous.progress or f"0/{rounds}",
            "stage": "",
            "conditions": merge_conditions(previous.conditions, updates, generation, now),
        }
    )


def _kept(previous: FederatedRoundStatus, type_: str) -> ConditionUpdate:
    """The previous condition of `type_` as it was (Degraded: AsExpected when there was none)."""
    found = condition(previous.conditions, type_)
    return ConditionUpdate(type_, found.status, found.reason, found.message) if found else AS_EXPECTED


def stuck(pods: Sequence[RoundPod], mount_failures: Mapping[str, str]) -> ConditionUpdate:
    """Degraded, from the round's pods: the first stuck one (the aggregator's before the clients') with its reason
    and its own message. `mount_failures`: by pod uid, why its volumes cannot be mounted (the kubelet's event)."""
    found = [(pod, pod.reason, pod.message) for pod in pods if pod.reason]
    found += [(pod, "MountFailed", mount_failures[pod.uid]) for pod in pods if pod.uid in mount_failures]
    if not found:
        return AS_EXPECTED
    found.sort(key=lambda item: (item[0].role != AGGREGATOR_ROLE, item[0].name))
    pod, reason, message = found[0]
    where = f" on node {pod.node}" if pod.node else ""
    more = f" (and {_plural(len(found) - 1, 'more stuck pod')})" if len(found) > 1 else ""
    return ConditionUpdate(DEGRADED, "True", reason, f"the {pod.role} pod {pod.name}{where}: {message}{more}")


def _plural(count: int, words: str) -> str:
    return f"{count} {words}{'' if count == 1 else 's'}"


def is_done(status: FederatedRoundStatus) -> bool:
    """Nothing about the round can change any more: it ended, and promotion was decided."""
    promoted = condition(status.conditions, PROMOTED)
    return status.phase in TERMINAL and promoted is not None and promoted.status != "Unknown"


def _succeeded(
    phase: str,
    status: FederatedRoundStatus,
    aggregator: JobState,
    report: AggregatorReport | None,
    report_error: str,
) -> ConditionUpdate:
    if phase == "Succeeded":
        trained, baseline, result = status.metrics, status.baseline, status.result
        message = ", ".join(
            part
            for part in (
                trained and f"accuracy {trained.accuracy:.4f}",
                baseline and f"starting model {baseline.accuracy:.4f}",
                f"{status.participants.reported} of {status.participants.selected} clients in the last round",
                result and f"published sha256 {result.sha256[:12]}…",
            )
            if part
        )
        return ConditionUpdate(SUCCEEDED, "True", "Trained", message)
    if phase == "Failed" and report is not None:
        return ConditionUpdate(SUCCEEDED, "False", "RoundFailed", report.reason)
    if phase == "Failed":
        return ConditionUpdate(
            SUCCEEDED,
            "False",
            "AggregatorFailed",
            f"the aggregator Job failed ({aggregator.reason}): {aggregator.message}",
        )
    if aggregator.finished:
        return ConditionUpdate(
            SUCCEEDED,
            "Unknown",
            "AwaitingReport",
            f"the aggregator Job completed, but its final report could not be read yet: {report_error}",
        )
    if not status.round:
        return ConditionUpdate(
            SUCCEEDED,
            "Unknown",
            "WaitingForAggregator",
            f"the aggregator has not reported yet: {report_error}" if report_error else "",
        )
    stage = f", stage {status.stage}" if status.stage else ""
    return ConditionUpdate(
        SUCCEEDED,
        "Unknown",
        "Training",
        f"round {status.progress}{stage}: {status.participants.reported} of {status.participants.selected} "
        "clients reported",
    )


def _promoted(phase: str, promotion: Promotion | None, previous: FederatedRoundStatus) -> ConditionUpdate:
    before = condition(previous.conditions, PROMOTED)
    if promotion is not None:
        return ConditionUpdate(PROMOTED, "True" if promotion.promoted else "False", promotion.reason, promotion.message)
    if before is not None and before.status != "Unknown":
        return ConditionUpdate(PROMOTED, before.status, before.reason, before.message)
    if phase == "Failed":
        return ConditionUpdate(PROMOTED, "False", "RoundFailed", "the round failed: there is nothing to promote")
    return ConditionUpdate(PROMOTED, "Unknown", "AwaitingResult", "decided when the round succeeds")


def compute(
    *,
    generation: int,
    spec: FederatedRoundSpec,
    round_name: str,
    nodes: Sequence[str],
    base_model: ModelRef,
    aggregator: JobState,
    report: AggregatorReport | None,
    report_error: str,
    promotion: Promotion | None,
    previous: FederatedRoundStatus,
    now: str,
    degraded: ConditionUpdate = AS_EXPECTED,
) -> FederatedRoundStatus:
    """A started round, from its aggregator Job and the latest report. With no report (none could be read
    this time), what earlier reports said stands. `degraded`: from its pods (`stuck`); once the round has
    ended, it says RoundEnded, unless the round failed while a pod was stuck (which may be why)."""
    rounds = spec.training.rounds
    if report is not None:
        round_, stage = report.round, report.stage or ""
        participants = ParticipantsStatus(**report.participants.model_dump(), nodes=list(nodes))
        baseline, metrics = report.baseline, report.metrics
        version = promoted_version(spec.promote, base_model.version, round_name)
        result = Result(uri=report.result.uri, sha256=report.result.sha256, version=version) if report.result else None
    else:
        round_, stage = previous.round, previous.stage
        participants = previous.participants.model_copy(update={"nodes": list(nodes)})
        if not previous.participants.selected:
            participants = participants.model_copy(update={"selected": len(nodes)})
        baseline, metrics, result = previous.baseline, previous.metrics, previous.result

    if report is not None and report.terminal:
        phase = report.phase
    elif aggregator.finished == "Failed":
        phase = "Failed"
    else:
        phase = "Running"

    status = FederatedRoundStatus(
        observed_generation=generation,
        phase=phase,
        round=round_,
        rounds=rounds,
        progress=f"{round_}/{rounds}",
        stage="" if phase in TERMINAL else stage,
        participants=participants,
        base_model=base_model,
        baseline=baseline,
        metrics=metrics,
        accuracy=f"{metrics.accuracy:#.3g}" if metrics else "",
        result=result,
    )
    started = ConditionUpdate(
        STARTED, "True", "JobsCreated", f"an aggregator and {len(nodes)} clients, on {_names(nodes)}"
    )
    succeeded = _succeeded(phase, status, aggregator, report if report and report.terminal else None, report_error)
    promoted = _promoted(phase, promotion, previous)
    if phase in TERMINAL:
        before = _kept(previous, DEGRADED)
        degraded = before if phase == "Failed" and before.status == "True" else ConditionUpdate(
            DEGRADED, "False", "RoundEnded", ""
        )
    updates = [started, succeeded, promoted, degraded]
    return status.model_copy(
        update={
            "promoted": promoted.status == "True",
            "conditions": merge_conditions(previous.conditions, updates, generation, now),
        }
    )


def transitions(previous: FederatedRoundStatus, current: FederatedRoundStatus) -> list[Event]:
    """Events worth recording on the FederatedRound: a condition reaching a new status or reason."""
    events = []
    before, now = condition(previous.conditions, DEGRADED), condition(current.conditions, DEGRADED)
    if now is not None and now.status == "True" and (before is None or (before.status, before.reason) != (
        now.status, now.reason
    )):
        events.append(Event("Warning", now.reason, now.message))
    if now is not None and now.status == "False" and before is not None and before.status == "True":
        events.append(Event("Normal", "Recovered", f"no pod of the round is stuck any more (was {before.reason})"))
    for type_ in (STARTED, SUCCEEDED, PROMOTED):
        before, now = condition(previous.conditions, type_), condition(current.conditions, type_)
        if now is None or now.status == "Unknown":
            continue
        if before is not None and (before.status, before.reason) == (now.status, now.reason):
            continue
        if now.status == "True":
            events.append(Event("Normal", type_, now.message))
        else:
            events.append(Event("Warning", now.reason, now.message))
    return events
