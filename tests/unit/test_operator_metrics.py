"""The operator's metrics: the fleet read from the custom resources' status, reconcile counts and latency,
which replica exports the fleet, and the `/metrics` endpoint as Prometheus reads it."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from edgeloop import config, metrics
from edgeloop.api.federatedround import FederatedRoundStatus, Metrics, ParticipantsStatus
from edgeloop.kube import KubeError
from edgeloop.testing import FakeKube
from prometheus_client.parser import text_string_to_metric_families
from test_inferencemodel_sync import KEY, MODEL, World


def samples(families) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}


def labelled(found: dict, name: str, **labels: str) -> float:
    [value] = [v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls]
    return value


def served_model(**in_use: str) -> dict:
    """An InferenceModel's body as the operator's sync leaves it: every variant rolled out and sampled."""
    world = World()
    world.in_use.update(in_use)
    world.reconcile()
    world.resync()
    world.resync()
    return world.kube.objects[MODEL]


def federated_round(name: str, phase: str, accuracy: float | None = None) -> dict:
    status = FederatedRoundStatus(
        phase=phase,
        round=3,
        rounds=5,
        participants=ParticipantsStatus(selected=3, reported=2, dropped=1),
        metrics=Metrics(accuracy=accuracy, loss=0.3) if accuracy is not None else None,
        baseline=Metrics(accuracy=0.1, loss=2.0),
    )
    return {
        "metadata": {"namespace": "edge", "name": name},
        "spec": {"modelRef": {"name": "digits"}},
        "status": status.to_wire(),
    }


def test_the_fleet_comes_from_the_status_the_operator_wrote():
    found = samples(
        metrics.fleet(
            [served_model(gpu="CPUExecutionProvider")],
            [federated_round("r1", "Succeeded", 0.9722), federated_round("r2", "Running")],
            config.build(),
        )
    )
    model = {"namespace": "edge", "inferencemodel": "digits"}
    assert labelled(found, "edgeloop_inferencemodel_info", **model, version="3", sha256="a" * 64) == 1
    assert labelled(found, "edgeloop_inferencemodel_condition", **model, condition="Ready", status="True") == 1
    assert (
        labelled(
            found,
            "edgeloop_inferencemodel_condition",
            **model,
            condition="Accelerated",
            status="False",
            reason="CPUFallback",
        )
        == 0
    )
    for accelerator in ("npu", "gpu", "cpu"):
        for state in ("desired", "ready", "updated"):
            assert labelled(found, "edgeloop_inferencemodel_nodes", **model, accelerator=accelerator, state=state) == 1
    # What each variant's runtime said it runs on, and the fallback per accelerator class (cpu has none to lose).
    assert (
        labelled(
            found, "edgeloop_inferencemodel_providers", **model, accelerator="gpu", providers="CPUExecutionProvider"
        )
        == 1
    )
    assert labelled(found, "edgeloop_inferencemodel_cpu_fallback", **model, accelerator="gpu") == 1
    assert labelled(found, "edgeloop_inferencemodel_cpu_fallback", **model, accelerator="npu") == 0
    assert not [k for k in found if k[0] == "edgeloop_inferencemodel_cpu_fallback" and ("accelerator", "cpu") in k[1]]
    # Rounds: one series per phase (1 for the current one), accuracy once trained, participants by state.
    round_1 = {"namespace": "edge", "federatedround": "r1", "inferencemodel": "digits"}
    assert labelled(found, "edgeloop_federatedround_phase", **round_1, phase="Succeeded") == 1
    assert labelled(found, "edgeloop_federatedround_phase", **round_1, phase="Failed") == 0
    assert labelled(found, "edgeloop_federatedround_accuracy", **round_1) == pytest.approx(0.9722)
    assert labelled(found, "edgeloop_federatedround_baseline_accuracy", **round_1) == pytest.approx(0.1)
    assert labelled(found, "edgeloop_federatedround_participants", **round_1, state="dropped") == 1
    assert not [k for k in found if k[0] == "edgeloop_federatedround_accuracy" and ("federatedround", "r2") in k[1]]


def test_no_label_grows_with_the_nodes():
    """1000 nodes behind a model change values, not series: no node name is ever a label."""
    body = served_model()
    small = metrics.fleet([body], [federated_round("r1", "Running")], config.build())
    for variant in body["status"]["variants"]:
        variant.update(desired=1000, ready=990, updated=1000)
    body["status"]["unhealthyNodes"] = [
        {"node": f"edge-{i}", "accelerator": "gpu", "reason": "FetchFailed"} for i in range(50)
    ]
    body["status"]["unhealthyNodeCount"] = 10
    big = metrics.fleet([body], [federated_round("r1", "Running")], config.build())
    assert samples(small).keys() == samples(big).keys()
    assert all("node" not in family.samples[0].labels for family in big if family.samples)


def test_a_hand_edited_status_is_left_out_not_a_failed_scrape():
    body = served_model()
    body["status"] = {"conditions": "nonsense"}
    assert samples(metrics.fleet([body], [], config.build())) == {}


def test_every_sync_is_counted_and_timed_per_kind_and_result():
    def count(result: str) -> float:
        return (
            metrics.REGISTRY.get_sample_value(
                "edgeloop_operator_reconciles_total", {"kind": "InferenceModel", "result": result}
            )
            or 0
        )

    timed = metrics.REGISTRY.get_sample_value
    before = (
        count("success"),
        count("error"),
        timed("edgeloop_operator_reconcile_duration_seconds_count", {"kind": "InferenceModel"}),
    )
    world = World()
    world.reconcile()
    world.kube.fail_apply = KubeError(500, "etcd is away")
    world.edit(model={"sha256": "b" * 64})
    with pytest.raises(KubeError):
        world.reconcile()
    after = (
        count("success"),
        count("error"),
        timed("edgeloop_operator_reconcile_duration_seconds_count", {"kind": "InferenceModel"}),
    )
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (1, 1, 2)


NOW = datetime(2026, 12, 1, tzinfo=UTC)


def peer(priority: int, seconds_ago: float = 1, lifetime: int = 60) -> dict:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seconds_ago)).isoformat()}


@pytest.mark.parametrize(
    ("peers", "outranked"),
    [
        ({"me": peer(7)}, False),
        ({"me": peer(7), "other": peer(3)}, False),
        ({"me": peer(7), "other": peer(9)}, True),
        ({"me": peer(7), "other": peer(7)}, True),  # Kopf pauses both
        ({"me": peer(7), "other": peer(9, seconds_ago=120)}, False),  # the higher one is dead
        ({"other": peer(3)}, True),  # not listed yet: Kopf starts paused
        ({"me": peer(7), "junk": {"priority": "x"}}, False),
    ],
)
def test_only_the_serving_replica_exports_the_fleet(peers, outranked):
    assert metrics.outranked(peers, 7, NOW) is outranked


def test_leadership_reads_the_peering_object_at_most_every_refresh():
    kube = FakeKube()
    now = datetime.now(UTC).isoformat()
    kube.put(
        {
            "kind": "ClusterKopfPeering",
            "metadata": {"name": "edgeloop"},
            "status": {
                "a": {"priority": 5, "lifetime": 60, "lastseen": now},
                "b": {"priority": 9, "lifetime": 60, "lastseen": now},
            },
        }
    )
    clock = [0.0]
    leadership = metrics.Leadership(kube, metrics.peering_from("edgeloop", [], 5), refresh=10, clock=lambda: clock[0])

    async def ask() -> bool:
        return await leadership.active()

    assert asyncio.run(ask()) is False
    kube.objects[("ClusterKopfPeering", "", "edgeloop")]["status"]["b"]["priority"] = 1
    clock[0] = 5
    assert asyncio.run(ask()) is False  # not read again yet
    clock[0] = 10
    assert asyncio.run(ask()) is True
    assert [c for c in kube.calls if c[0] == "list"] == [("list", "clusterkopfpeerings", "metadata.name=edgeloop")] * 2
    standalone = metrics.Leadership(kube, metrics.peering_from(None, [], 5))
    assert asyncio.run(standalone.active()) is True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("active", [True, False])
def test_the_endpoint_speaks_prometheus_text_format(active):
    world = World()
    world.reconcile()
    world.resync()
    port = free_port()

    class Fixed:
        async def active(self) -> bool:
            return active

    async def scrape() -> str:
        collector = metrics.FleetCollector(config.build(), world.kube.indexed("InferenceModel"), {}, {"edge": [True]})
        runner = await metrics.serve(port, collector, Fixed(), host="127.0.0.1")
        try:
            return await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            )
        finally:
            await runner.cleanup()

    families = {f.name: f for f in text_string_to_metric_families(asyncio.run(scrape()))}
    assert families["edgeloop_operator_active"].samples[0].value == (1 if active else 0)
    assert "edgeloop_operator_reconciles" in families and "process_resident_memory_bytes" in families
    assert ("edgeloop_inferencemodel_condition" in families) is active, "a standby exports no stale fleet"
    if active:
        [ready] = [s for s in families["edgeloop_inferencemodel_condition"].samples if s.labels["condition"] == "Ready"]
        assert ready.labels["inferencemodel"] == KEY[1] and ready.value == 1
