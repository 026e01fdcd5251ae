"""FederatedRound status and promotion gate: pure functions of the aggregator Job, its report and the
status before."""

from __future__ import annotations

import json

import pytest
from edgeloop import config
from edgeloop.api.common import ModelRef
from edgeloop.api.federatedround import FederatedRoundStatus, Metrics, Promote
from edgeloop.render.federatedround import aggregator_job
from edgeloop.status import condition
from edgeloop.status.federatedround import (
    AggregatorReport,
    JobState,
    Promotion,
    Waiting,
    compute,
    gate,
    improves,
    is_done,
    parse_report,
    pending,
    promoted_version,
    promotion,
    transitions,
)
from fr_factories import NODES, OWNER, SHA_TRAINED, START, job, report, spec

BASE = ModelRef(sha256=START.model.sha256, version="3")
NOW = "2026-11-28T10:00:00Z"


def aggregator(finished: str = "", reason: str = "") -> JobState:
    return JobState.from_object(
        job(aggregator_job(OWNER, spec(), config.build(), START), finished=finished, reason=reason)
    )


def status(previous=None, *, agg=None, reported=None, error="", promotion=None, **spec_override):
    return compute(
        generation=1,
        spec=spec(**spec_override),
        round_name=OWNER.name,
        nodes=NODES,
        base_model=BASE,
        aggregator=agg or aggregator(),
        report=AggregatorReport.model_validate(reported) if reported else None,
        report_error=error,
        promotion=promotion,
        previous=previous or FederatedRoundStatus(),
        now=NOW,
    )


def conditions(result, *types):
    """By type, (status, reason) of the conditions of `types`, by default of all but Degraded (tested apart)."""
    types = types or ("Started", "Succeeded", "Promoted")
    return {c.type: (c.status, c.reason) for c in result.conditions if c.type in types}


def test_a_waiting_round_is_pending_and_says_why():
    waiting = Waiting("NotEnoughNodes", "2 of the minClients 3 nodes are available")
    result = pending(generation=1, rounds=5, waiting=waiting, previous=FederatedRoundStatus(), now=NOW)
    assert (result.phase, result.progress) == ("Pending", "0/5")
    assert conditions(result) == {
        "Started": ("False", "NotEnoughNodes"),
        "Succeeded": ("Unknown", "NotStarted"),
        "Promoted": ("Unknown", "NotStarted"),
    }
    assert condition(result.conditions, "Started").message == waiting.message


def test_started_before_the_aggregator_reports():
    result = status(error="GET http://…: connection refused")
    assert (result.phase, result.round, result.progress) == ("Running", 0, "0/5")
    assert (result.participants.selected, result.participants.nodes) == (3, list(NODES))
    assert result.base_model == BASE
    assert conditions(result) == {
        "Started": ("True", "JobsCreated"),
        "Succeeded": ("Unknown", "WaitingForAggregator"),
        "Promoted": ("Unknown", "AwaitingResult"),
    }
    assert "connection refused" in condition(result.conditions, "Succeeded").message
    assert "edge-cpu-0, edge-gpu-0, edge-npu-0" in condition(result.conditions, "Started").message


def test_the_report_drives_round_stage_and_participants_live():
    result = status(reported=report())
    assert (result.phase, result.round, result.rounds, result.progress, result.stage) == (
        "Running",
        2,
        5,
        "2/5",
        "collect",
    )
    p = result.participants
    assert (p.selected, p.reported, p.dropped, p.nodes) == (3, 2, 1, list(NODES))
    assert result.baseline == Metrics(accuracy=0.4, loss=1.9) and result.metrics is None
    assert conditions(result)["Succeeded"] == ("Unknown", "Training")
    assert condition(result.conditions, "Succeeded").message == "round 2/5, stage collect: 2 of 3 clients reported"


def test_an_unreadable_report_keeps_what_the_last_one_said():
    live = status(reported=report())
    later = status(live, error="timed out")
    assert (later.round, later.participants, later.baseline) == (live.round, live.participants, live.baseline)
    assert later == live, "nothing to write"


def test_success_publishes_the_result_with_the_version_it_is_promoted_as():
    promotion = Promotion(True, "Promoted", "InferenceModel digits serves version 4")
    result = status(reported=report("Succeeded"), promotion=promotion)
    assert (result.phase, result.stage, result.progress) == ("Succeeded", "", "5/5")
    assert result.metrics == Metrics(accuracy=0.93, loss=0.25)
    assert (result.result.sha256, result.result.version) == (SHA_TRAINED, "4")
    assert result.promoted is True
    assert conditions(result) == {
        "Started": ("True", "JobsCreated"),
        "Succeeded": ("True", "Trained"),
        "Promoted": ("True", "Promoted"),
    }
    message = condition(result.conditions, "Succeeded").message
    assert message == (
        "accuracy 0.9300, starting model 0.4000, 3 of 3 clients in the last round, "
        f"published sha256 {SHA_TRAINED[:12]}…"
    )
    assert is_done(result)


@pytest.mark.parametrize(("accuracy", "shown"), [(0.9722222222222222, "0.972"), (1.0, "1.00"), (0.05, "0.0500")])
def test_kubectl_get_shows_the_accuracy_to_three_significant_digits(accuracy, shown):
    result = status(reported=report("Succeeded", metrics={"accuracy": accuracy, "loss": 0.1}))
    assert result.accuracy == shown and result.metrics.accuracy == accuracy
    assert status(reported=report("Running")).accuracy == ""


def test_a_refused_promotion_is_recorded_and_final():
    refusal = Promotion(False, "BelowMinAccuracy", "accuracy 0.9300 is below minAccuracy 0.95")
    result = status(reported=report("Succeeded"), promotion=refusal)
    assert result.phase == "Succeeded" and result.promoted is False
    assert conditions(result)["Promoted"] == ("False", "BelowMinAccuracy")
    assert is_done(result)


def test_the_aggregator_reporting_failure_fails_the_round():
    result = status(reported=report("Failed"))
    assert result.phase == "Failed"
    assert conditions(result)["Succeeded"] == ("False", "RoundFailed")
    assert "only 1 of 3 clients" in condition(result.conditions, "Succeeded").message
    assert conditions(result)["Promoted"] == ("False", "RoundFailed")
    assert is_done(result)


def test_a_failed_aggregator_job_without_a_report_fails_the_round():
    result = status(status(reported=report()), agg=aggregator("Failed", "BackoffLimitExceeded"), error="refused")
    assert result.phase == "Failed"
    assert conditions(result)["Succeeded"] == ("False", "AggregatorFailed")
    assert "BackoffLimitExceeded" in condition(result.conditions, "Succeeded").message


def test_a_completed_aggregator_whose_report_is_unreadable_is_awaited_not_guessed():
    result = status(status(reported=report()), agg=aggregator("Complete"), error="no pod left")
    assert result.phase == "Running"
    assert conditions(result)["Succeeded"] == ("Unknown", "AwaitingReport")
    assert not is_done(result)


def test_transition_times_stay_while_a_condition_holds():
    first = status(reported=report())
    later = compute(
        generation=1,
        spec=spec(),
        round_name=OWNER.name,
        nodes=NODES,
        base_model=BASE,
        aggregator=aggregator(),
        report=AggregatorReport.model_validate(report(round=3)),
        report_error="",
        promotion=None,
        previous=first,
        now="2026-11-28T11:00:00Z",
    )
    assert later.round == 3
    assert [c.last_transition_time for c in later.conditions] == [NOW] * 4


# ---- the gate


def passing(**fields) -> Promote:
    return Promote.model_validate(fields)


SUCCEEDED = AggregatorReport.model_validate(report("Succeeded"))


def test_the_gate_passes_an_improved_model_above_min_accuracy():
    assert gate(passing(minAccuracy=0.9), True, SUCCEEDED) is None


@pytest.mark.parametrize(
    ("promote", "has_target", "changes", "reason"),
    [
        ({"enabled": False}, True, {}, "PromotionDisabled"),
        ({}, False, {}, "NoModelRef"),
        ({"minAccuracy": 0.95}, True, {}, "BelowMinAccuracy"),
        ({}, True, {"baseline": {"accuracy": 0.95, "loss": 0.1}}, "NotImproved"),
        ({}, True, {"baseline": None}, "NoBaseline"),
        ({}, True, {"result": None}, "NoResult"),
    ],
)
def test_the_gate_refuses_with_a_reason(promote, has_target, changes, reason):
    refusal = gate(passing(**promote), has_target, AggregatorReport.model_validate(report("Succeeded", **changes)))
    assert refusal is not None and refusal.promoted is False and refusal.reason == reason
    assert refusal.message


def test_without_require_improvement_a_worse_model_may_pass():
    worse = AggregatorReport.model_validate(report("Succeeded", baseline={"accuracy": 0.99, "loss": 0.01}))
    assert gate(passing(requireImprovement=False), True, worse) is None


def test_improvement_is_higher_accuracy_or_equal_accuracy_at_lower_loss():
    base = Metrics(accuracy=0.9, loss=0.3)
    assert improves(Metrics(accuracy=0.91, loss=0.5), base)
    assert improves(Metrics(accuracy=0.9, loss=0.29), base)
    assert not improves(Metrics(accuracy=0.9, loss=0.3), base)
    assert not improves(Metrics(accuracy=0.89, loss=0.1), base)


def test_promotion_writes_only_over_the_model_served_when_the_round_started():
    result = AggregatorReport.model_validate(report("Succeeded")).result
    started_from = START.serving_sha256
    written = promotion("digits", {"sha256": started_from, "version": "3"}, started_from, result, "4")
    assert (written.promoted, written.reason) == (True, "Promoted")
    assert written.write == {"uri": result.uri, "sha256": SHA_TRAINED, "version": "4"}
    done = promotion("digits", {"sha256": SHA_TRAINED, "version": "4"}, started_from, result, "4")
    assert (done.promoted, done.write) == (True, None), "already promoted, e.g. before a restart"
    moved = promotion("digits", {"sha256": "c" * 64, "version": "9"}, started_from, result, "4")
    assert (moved.promoted, moved.reason, moved.write) == (False, "InferenceModelChanged", None)
    assert "moved on to version 9" in moved.message
    gone = promotion("digits", None, started_from, result, "4")
    assert (gone.promoted, gone.reason) == (False, "InferenceModelNotFound")


@pytest.mark.parametrize(
    ("promote", "base", "expected"),
    [({}, "3", "4"), ({}, "v3", "v3-digits-round-1"), ({"version": "2026.11"}, "3", "2026.11")],
)
def test_the_promoted_version(promote, base, expected):
    assert promoted_version(passing(**promote), base, "digits-round-1") == expected


# ---- events and the report contract


def test_events_on_transitions_only():
    waiting = pending(
        generation=1, rounds=5, waiting=Waiting("NotEnoughNodes", "…"), previous=FederatedRoundStatus(), now=NOW
    )
    assert [(e.type, e.reason) for e in transitions(FederatedRoundStatus(), waiting)] == [("Warning", "NotEnoughNodes")]
    running = status(waiting, reported=report())
    assert [(e.type, e.reason) for e in transitions(waiting, running)] == [("Normal", "Started")]
    assert transitions(running, status(running, reported=report(round=3))) == []
    done = status(running, reported=report("Succeeded"), promotion=Promotion(True, "Promoted", "…"))
    assert [(e.type, e.reason) for e in transitions(running, done)] == [("Normal", "Succeeded"), ("Normal", "Promoted")]


def test_the_runtime_aggregators_own_status_parses(tmp_path):
    """The contract with edgeloop-runtime: what its aggregator reports is what the operator reads."""
    from edgeloop_runtime.federated.aggregator import Aggregator, Settings
    from edgeloop_runtime.federated.model import mlp

    live = Aggregator(Settings(rounds=4, clients=3, min_clients=2, state_dir=tmp_path), mlp([4, 3])).status()
    parsed = parse_report(json.dumps(live))
    assert (parsed.phase, parsed.round, parsed.rounds) == ("Running", 0, 4)
    assert (parsed.participants.selected, parsed.result, parsed.metrics) == (3, None, None)


@pytest.mark.parametrize("text", ["", "starting aggregator on :8080", '{"phase": "Done"}', "[]"])
def test_anything_else_is_not_a_report(text):
    with pytest.raises(ValueError):
        parse_report(text)


def test_the_aggregator_stuck_comes_first_and_the_others_are_counted():
    from edgeloop.status.diagnosis import RoundPod
    from edgeloop.status.federatedround import stuck

    pods = [
        RoundPod("r-client-0-a", "u0", "j0", "client", "edge-a", "ImagePullFailed", "no such image"),
        RoundPod("r-client-1-b", "u1", "j1", "client", "edge-b", creating_since="2026-11-28T10:00:00Z"),
        RoundPod("r-aggregator-c", "u2", "j2", "aggregator", "", "Unschedulable", "0/6 nodes are available"),
    ]
    found = stuck(pods, {"u1": "secret not found"})
    assert (found.status, found.reason) == ("True", "Unschedulable")
    assert found.message == "the aggregator pod r-aggregator-c: 0/6 nodes are available (and 2 more stuck pods)"
    assert stuck(pods[1:2], {}).status == "False"


def test_degraded_says_round_ended_once_it_succeeded_but_keeps_what_was_stuck_when_it_failed():
    from edgeloop.status import ConditionUpdate

    stuck_pod = ConditionUpdate("Degraded", "True", "MountFailed", "the client pod …")
    running = compute(generation=1, spec=spec(), round_name=OWNER.name, nodes=NODES, base_model=BASE,
                      aggregator=aggregator(), report=AggregatorReport.model_validate(report()), report_error="",
                      promotion=None, previous=FederatedRoundStatus(), now=NOW, degraded=stuck_pod)
    assert conditions(running, "Degraded") == {"Degraded": ("True", "MountFailed")}
    failed = compute(generation=1, spec=spec(), round_name=OWNER.name, nodes=NODES, base_model=BASE,
                     aggregator=aggregator(finished="Failed"), report=None, report_error="", promotion=None,
                     previous=running, now=NOW, degraded=stuck_pod)
    assert conditions(failed, "Degraded") == {"Degraded": ("True", "MountFailed")}
    succeeded = compute(generation=1, spec=spec(), round_name=OWNER.name, nodes=NODES, base_model=BASE,
                        aggregator=aggregator(), report=AggregatorReport.model_validate(report("Succeeded")),
                        report_error="", promotion=None, previous=running, now=NOW, degraded=stuck_pod)
    assert conditions(succeeded, "Degraded") == {"Degraded": ("False", "RoundEnded")}
