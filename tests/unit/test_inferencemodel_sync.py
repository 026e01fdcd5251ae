"""The InferenceModel sync against an in-memory stand-in for the operator's API client and Kopf's indexes:
what it writes, and above all what it does not write."""

from __future__ import annotations

import asyncio
import copy
import json
import time

import pytest
from edgeloop import config
from edgeloop.handlers.inferencemodel import InferenceModels, ServiceState
from edgeloop.handlers.shared import ALL_NODES
from edgeloop.kube import KubeError
from edgeloop.names import ACCELERATOR_LABEL, MODEL_VERSION_ANNOTATION, RENDER_HASH, TEMPLATE_LABEL
from edgeloop.nodes import NodeInfo
from edgeloop.status.inferencemodel import DaemonSetState
from edgeloop.testing import FakeKube
from im_factories import SHA_B, daemon_set_status, inference_model

KEY = ("edge", "digits")
MODEL = ("InferenceModel", *KEY)
COALESCE = 0.02


class World:
    """The operator's view: Kopf indexes as plain dicts, refreshed from the fake API server."""

    def __init__(self, operator_config=None, body=None, clock=None, diagnosis_interval=60):
        self.kube = FakeKube()
        self.body = self.kube.put(body or inference_model())
        self.models, self.daemon_sets, self.services = {}, {}, {}
        self.nodes = {ALL_NODES: [NodeInfo("edge-cpu-0", {})]}
        self.namespaces = {"edge": [True]}
        self.counts: dict[str, tuple[int, int]] = {}
        self.extra_pods: list[dict] = []  # besides one ready pod per variant with ready nodes
        self.in_use: dict[str, str] = {}  # what a class's runtime reports; default: the providers configured
        self.ready_pod = True  # a ready pod of the current template on each variant's first node
        self.events = []
        self.controller = InferenceModels(
            config=operator_config or config.build(), kube=self.kube, models=self.models,
            daemon_sets=self.daemon_sets, services=self.services, nodes=self.nodes, namespaces=self.namespaces,
            coalesce_seconds=COALESCE, diagnosis_interval=diagnosis_interval,
            post_event=lambda body, **event: self.events.append((event["type"], event["reason"])),
            clock=clock or (lambda: 0.0),
        )
        self.refresh()

    def refresh(self, **counts_by_class):
        """Let the watches catch up; DaemonSets of a class get (desired, ready[, updated]) from now on, default
        (1, 1)."""
        self.counts.update(counts_by_class)
        self.models[KEY] = [copy.deepcopy(self.kube.objects[MODEL])]
        daemon_sets = []
        for (kind, _, _), obj in self.kube.objects.items():
            if kind == "DaemonSet":
                accelerator = obj["metadata"]["labels"]["edgeloop.io/accelerator"]
                desired, ready, *updated = self.counts.get(accelerator, (1, 1))
                live = daemon_set_status(obj, desired=desired, ready=ready, updated=updated[0] if updated else None)
                daemon_sets.append(DaemonSetState.from_object(live))
        self.daemon_sets[KEY] = daemon_sets
        self.kube.pods = [*(self.ready_pods() if self.ready_pod else ()), *self.extra_pods]
        self.services[KEY] = [
            ServiceState(o["metadata"]["name"], o["metadata"]["uid"], o["metadata"]["annotations"][RENDER_HASH])
            for (kind, _, _), o in self.kube.objects.items() if kind == "Service"
        ]

    def ready_pods(self):
        for (kind, _, name), obj in self.kube.objects.items():
            if kind == "DaemonSet" and self.counts.get(accelerator := obj["metadata"]["labels"][ACCELERATOR_LABEL],
                                                       (1, 1))[1]:
                pod = f"{name}-ready"
                configured = ",".join(self.controller._config.accelerator_class(accelerator).execution_providers)
                providers = self.in_use.get(accelerator, configured)
                answer = {"name": "digits", "parameters": {"execution_providers": providers}}
                self.kube.proxied[pod] = json.dumps(answer)
                yield {
                    "metadata": {"name": pod, "labels": obj["spec"]["template"]["metadata"]["labels"]},
                    "spec": {"nodeName": f"edge-{accelerator}-0"},
                    "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
                }

    def edit(self, **spec_override):
        current = self.kube.objects[MODEL]
        generation = current["metadata"]["generation"] + 1
        updated = self.kube.put(inference_model(generation=generation, **spec_override))
        self.refresh()
        return updated

    def reconcile(self, body=None):
        async def reconcile():
            await self.controller.reconcile(body or self.kube.objects[MODEL])
            await self.answers()

        asyncio.run(reconcile())
        self.refresh()

    def resync(self):
        async def resync():
            await self.controller.runner.run(KEY)
            await self.answers()

        asyncio.run(resync())
        self.refresh()

    async def answers(self):
        """The runtimes asked by the sync answer, and the sync each answer requests runs (after the watches
        caught up: it comes after the coalescing delay)."""
        await self.controller.asked()
        self.refresh()
        runner, loop = self.controller.runner, asyncio.get_running_loop()
        for _ in range(200):
            await asyncio.sleep(0.01)
            soon = [task for when, task in runner._scheduled.values() if when <= loop.time() + COALESCE]
            if not soon and not runner._running:
                return


def test_create_applies_every_object_once_and_reports_status():
    world = World()
    world.reconcile()
    applied = [call for call in world.kube.writes() if call[0] == "apply"]
    assert applied == [("apply", "DaemonSet", "digits-npu"), ("apply", "DaemonSet", "digits-gpu"),
                       ("apply", "DaemonSet", "digits-cpu"), ("apply", "Service", "digits")]
    assert world.kube.writes()[-1] == ("patch_status", "inferencemodels", "digits")
    assert ("Normal", "RollingOut") in world.events


def test_a_resync_of_an_unchanged_object_makes_no_call_at_all():
    world = World()
    world.reconcile()
    world.resync()  # the status now reflects the ready DaemonSets
    world.kube.calls.clear()
    world.events.clear()
    for _ in range(3):
        world.resync()
        world.reconcile()  # as on an operator restart (Kopf's resume)
    assert world.kube.calls == [] and world.events == []


def test_a_sync_before_the_watch_delivers_the_written_status_neither_writes_nor_repeats_events():
    world = World()
    world.reconcile()
    world.resync()
    world.refresh(cpu=(1, 0))  # a runtime stops being ready
    world.events.clear()
    asyncio.run(world.controller.runner.run(KEY))  # written; the index still has the Ready status
    assert ("Normal", "RollingOut") not in world.events and world.kube.writes()[-1][0] == "patch_status"
    world.kube.calls.clear()
    world.events.clear()
    asyncio.run(world.controller.runner.run(KEY))
    assert world.kube.calls == [] and world.events == []


def test_a_new_model_rolls_the_daemon_sets_and_leaves_the_service_alone():
    world = World()
    world.reconcile()
    world.kube.calls.clear()
    world.reconcile(world.edit(model={"sha256": SHA_B, "version": "4"}))
    applied = [c[2] for c in world.kube.writes() if c[0] == "apply"]
    assert applied == ["digits-npu", "digits-gpu", "digits-cpu"]


def test_a_placement_change_removes_the_variant_no_longer_listed():
    world = World()
    world.reconcile()
    world.kube.calls.clear()
    world.reconcile(world.edit(placement={"accelerators": ["gpu", "cpu"]}))
    deletes = [c for c in world.kube.writes() if c[0] == "delete"]
    assert deletes == [("delete", "daemonsets", "digits-npu", "uid-DaemonSet-digits-npu")]
    assert not [c for c in world.kube.writes() if c[0] == "apply" and c[2] == "digits-npu"]


def test_a_sync_from_a_stale_index_writes_nothing_for_a_deleted_model():
    world = World()
    world.reconcile()
    del world.kube.objects[("DaemonSet", "edge", "digits-gpu")]  # someone deleted a DaemonSet ...
    del world.kube.objects[MODEL]  # ... or the garbage collector, after the model
    world.daemon_sets[KEY] = [ds for ds in world.daemon_sets[KEY] if ds.name != "digits-gpu"]
    world.kube.calls.clear()
    asyncio.run(world.controller.runner.run(KEY))
    assert world.kube.calls == [("get", "inferencemodels", "digits")]


def test_a_deleted_daemon_set_is_recreated():
    world = World()
    world.reconcile()
    del world.kube.objects[("DaemonSet", "edge", "digits-gpu")]
    world.refresh()
    world.kube.calls.clear()
    world.resync()
    assert [c for c in world.kube.writes() if c[0] == "apply"] == [("apply", "DaemonSet", "digits-gpu")]


def test_a_class_the_operator_lacks_is_degraded_without_retrying():
    world = World(config.build({"acceleratorClasses": {"npu": None}}))
    world.reconcile()
    status = world.kube.objects[MODEL]["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "UnknownAcceleratorClass")
    assert not [c for c in world.kube.calls if c[0] == "apply"]
    world.kube.calls.clear()
    world.resync()
    assert world.kube.calls == []


def test_a_rejected_apply_is_degraded_and_a_transient_error_is_raised_for_retry():
    world = World()
    world.kube.fail_apply = KubeError(422, 'DaemonSet.apps "digits-npu" is invalid')
    world.reconcile()
    status = world.kube.objects[MODEL]["status"]
    assert next(c for c in status["conditions"] if c["type"] == "Degraded")["reason"] == "ApplyRejected"

    world.kube.fail_apply = KubeError(503, "etcd leader changed")
    with pytest.raises(KubeError):
        world.reconcile(world.edit(model={"sha256": SHA_B}))


CPU_PODS = "edgeloop.io/inferencemodel=digits,edgeloop.io/accelerator=cpu"
CRASH_LOOPING_POD = {"metadata": {"name": "p", "labels": dict(term.split("=") for term in CPU_PODS.split(","))},
                     "spec": {"nodeName": "edge-cpu-0"}, "status": {
    "conditions": [{"type": "Ready", "status": "False"}, {"type": "Initialized", "status": "True"}],
    "containerStatuses": [{"name": "runtime", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                           "lastState": {"terminated": {"exitCode": 1, "message": "model load failed"}}}]}}


def diagnosis_lists(world):
    """Lists of pods to see why nodes do not serve (not the one that finds a pod to ask its providers)."""
    return [c for c in world.kube.calls if c[0] == "list" and "status.phase" not in c[2]]


def test_pods_are_looked_at_only_for_a_stalled_rollout_and_not_too_often():
    now = [0.0]
    world = World(clock=lambda: now[0])
    world.reconcile()
    world.refresh(cpu=(3, 1))
    world.extra_pods = [CRASH_LOOPING_POD]
    world.refresh()
    world.kube.calls.clear()
    world.resync()
    now[0] = 59
    world.resync()
    assert not diagnosis_lists(world), "the rollout may still progress: no pods listed"

    now[0] = 60
    world.resync()
    assert diagnosis_lists(world) == [("list", "pods", CPU_PODS)], (
        "a minute without progress: only the variant with unready nodes is looked at")
    unhealthy = [{"node": "edge-cpu-0", "accelerator": "cpu", "reason": "RuntimeFailed",
                  "message": "model load failed"}]
    assert world.kube.objects[MODEL]["status"]["unhealthyNodes"] == unhealthy

    world.kube.calls.clear()
    now[0] = 119
    world.resync()
    assert not diagnosis_lists(world), "within the diagnosis interval the last findings are reused"
    world.refresh(cpu=(3, 2))
    now[0] = 200
    world.resync()
    assert not diagnosis_lists(world), "progress again: the last findings stand"
    assert world.kube.objects[MODEL]["status"]["unhealthyNodes"] == unhealthy


def test_a_stalled_rollout_is_looked_at_without_waiting_for_the_resync():
    world = World(clock=time.monotonic, diagnosis_interval=0.05)
    world.reconcile()
    world.refresh(cpu=(3, 1))
    world.extra_pods = [CRASH_LOOPING_POD]
    world.refresh()
    world.kube.calls.clear()

    async def scenario():
        await world.controller.runner.run(KEY)  # the stall begins: nothing to look at yet
        assert not diagnosis_lists(world)
        await asyncio.sleep(0.2)  # no watch event and no resync: only the sync it asked for
        await world.controller.runner.close()

    asyncio.run(scenario())
    assert ("list", "pods", "edgeloop.io/inferencemodel=digits,edgeloop.io/accelerator=cpu") in world.kube.calls
    unhealthy = world.kube.objects[MODEL]["status"]["unhealthyNodes"]
    assert [n["reason"] for n in unhealthy] == ["RuntimeFailed"]


def test_a_model_in_a_namespace_being_deleted_is_forgotten_without_a_call():
    """Kopf stops watching a namespace being deleted before the deletions of its objects reach the
    indexes: the model stays indexed, but its namespace is gone from the index of namespaces."""
    now = [0.0]
    world = World(clock=lambda: now[0])
    world.reconcile()
    world.refresh(cpu=(3, 1))
    del world.namespaces["edge"]
    world.kube.calls.clear()
    for now[0] in (0, 60, 120):
        world.resync()
    assert world.kube.calls == [], "no status, no pods, no events read for a model that is gone"


def test_a_model_deleted_during_a_sync_is_not_an_error():
    world = World()
    body = world.kube.objects.pop(MODEL)  # deleted after the watch showed it: patch_status answers None (404)
    asyncio.run(world.controller.reconcile(body))
    assert world.events == [], "no Event about an object that is gone"


# ---- providers in use, asked of the runtimes


def proxied(world):
    return [c for c in world.kube.calls if c[0] == "proxy_get"]


def test_each_variant_is_asked_once_what_it_runs_on_then_not_again():
    world = World()
    world.reconcile()
    world.resync()
    assert sorted(proxied(world)) == [
        ("proxy_get", f"digits-{accelerator}-ready", "/v2/models/digits") for accelerator in ("cpu", "gpu", "npu")
    ], "one ready pod per variant: O(variants), not O(nodes)"
    status = world.kube.objects[MODEL]["status"]
    assert {v["accelerator"]: v["providersInUse"] for v in status["variants"]}["gpu"] == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert next(c for c in status["conditions"] if c["type"] == "Accelerated")["reason"] == "AcceleratorsInUse"
    world.kube.calls.clear()
    for _ in range(3):
        world.resync()
    assert world.kube.calls == []


def test_a_cpu_fallback_is_reported_with_a_warning_and_asked_again_after_a_rollout():
    world = World()
    world.in_use["gpu"] = "CPUExecutionProvider"
    world.reconcile()
    world.resync()
    status = world.kube.objects[MODEL]["status"]
    accelerated = next(c for c in status["conditions"] if c["type"] == "Accelerated")
    assert (accelerated["status"], accelerated["reason"]) == ("False", "CPUFallback")
    assert "without CUDAExecutionProvider on node edge-gpu-0" in accelerated["message"]
    assert ("Warning", "CPUFallback") in world.events
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "True"

    world.in_use.clear()  # e.g. the driver installed, and a new model version rolled out
    world.reconcile(world.edit(model={"sha256": SHA_B, "version": "4"}))
    world.kube.calls.clear()
    world.resync()
    assert len(proxied(world)) == 3
    status = world.kube.objects[MODEL]["status"]
    assert next(c for c in status["conditions"] if c["type"] == "Accelerated")["reason"] == "AcceleratorsInUse"


def test_a_runtime_that_cannot_be_asked_is_asked_again_only_after_the_interval():
    now = [0.0]
    world = World(clock=lambda: now[0])
    world.reconcile()
    world.kube.proxied["digits-gpu-ready"] = KubeError(503, "no route to the pod")
    world.kube.calls.clear()
    world.resync()
    status = world.kube.objects[MODEL]["status"]
    accelerated = next(c for c in status["conditions"] if c["type"] == "Accelerated")
    assert (accelerated["status"], accelerated["reason"]) == ("Unknown", "NotSampled")
    assert accelerated["message"].startswith("not known yet for gpu")
    world.kube.calls.clear()
    now[0] = 59
    world.resync()
    assert proxied(world) == []
    now[0] = 60
    world.resync()
    assert proxied(world) == [("proxy_get", "digits-gpu-ready", "/v2/models/digits")]


def test_an_image_outside_the_allowlist_is_degraded_and_nothing_is_applied():
    world = World(config.build({"allowedImages": ["ghcr.io/edgeloop/*"]}),
                  body=inference_model(runtime={"image": "docker.io/evil/miner:1"}))
    world.reconcile()
    assert not [c for c in world.kube.calls if c[0] == "apply"]
    degraded = next(c for c in world.kube.objects[MODEL]["status"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ImageNotAllowed")
    assert "docker.io/evil/miner:1 is not in allowedImages" in degraded["message"]
# ---- rollouts: old pods replaced by the operator, on reachable nodes


def old_pod(node: str, template: str, *, ready: bool = True, name: str = "old") -> dict:
    labels = {**dict(term.split("=") for term in CPU_PODS.split(",")), TEMPLATE_LABEL: template}
    return {
        "metadata": {"name": f"{name}-{node}", "uid": f"uid-{name}-{node}", "labels": labels,
                     "annotations": {MODEL_VERSION_ANNOTATION: "3"}, "creationTimestamp": "2026-11-28T09:00:00Z"},
        "spec": {"nodeName": node},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def pod_deletions(world):
    return [c[2] for c in world.kube.writes() if c[0] == "delete" and c[1] == "pods"]


def test_a_new_version_replaces_old_pods_on_reachable_nodes_only_and_reports_the_offline_ones():
    cpu_only = {"placement": {"accelerators": ["cpu"]}, "rollout": {"maxUnavailable": 1}}
    world = World(body=inference_model(**cpu_only))
    unreachable = {"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"}
    world.nodes[ALL_NODES] = [
        *(NodeInfo(f"edge-cpu-{i}", {}) for i in range(4)),
        NodeInfo("edge-cpu-4", {}, taints=(unreachable,), ready=False, unreachable=True,
                 ready_since="2026-11-28T09:30:00Z"),
    ]
    world.reconcile()
    old_template = world.kube.objects[("DaemonSet", "edge", "digits-cpu")]["spec"]["template"]["metadata"][
        "labels"][TEMPLATE_LABEL]
    world.edit(model={"sha256": SHA_B, "version": "4"}, **cpu_only)
    world.reconcile()
    # The DaemonSet (OnDelete) made a pod of the new template on edge-cpu-0 only; the rest are old.
    world.extra_pods = [old_pod(f"edge-cpu-{i}", old_template) for i in (1, 2, 3)]
    world.extra_pods.append(old_pod("edge-cpu-4", old_template, ready=False))
    world.refresh(cpu=(4, 4, 1))
    world.kube.calls.clear()
    world.resync()

    assert pod_deletions(world) == ["old-edge-cpu-1"], "maxUnavailable 1 of the 4 reachable nodes; never edge-cpu-4"
    status = world.kube.objects[MODEL]["status"]
    assert status["offlineNodes"] == [{"node": "edge-cpu-4", "accelerator": "cpu", "reason": "Unreachable",
                                       "since": "2026-11-28T09:30:00Z", "version": "3", "updated": False}]
    assert (status["offlineNodeCount"], status["desiredNodes"], status["updatedNodes"]) == (1, 5, 1)
    assert status["rollout"]["state"] == "RollingOut"
    assert next(c for c in status["conditions"] if c["type"] == "Degraded")["status"] == "False"

    # Until the DaemonSet's counts move, its pods are not listed again, and nothing more is deleted.
    world.kube.calls.clear()
    world.resync()
    assert world.kube.calls == []


def test_a_model_with_nothing_to_replace_lists_no_pod():
    """A burst of new models: their pods are all of the current template, however unready."""
    world = World()
    world.reconcile()
    world.refresh(cpu=(3, 1))
    world.kube.calls.clear()
    world.resync()
    assert not diagnosis_lists(world)
    assert world.kube.objects[MODEL]["status"]["rollout"]["state"] == "RollingOut"
    world.refresh(cpu=(3, 3))
    world.resync()
    assert world.kube.objects[MODEL]["status"]["rollout"]["state"] == "Complete"


def test_a_canary_that_cannot_be_scheduled_halts_the_rollout_though_no_count_moves():
    now = [0.0]
    spec = {"placement": {"accelerators": ["cpu"]}, "rollout": {"waves": [1], "pauseSeconds": 10}}
    world = World(body=inference_model(**spec), clock=lambda: now[0], diagnosis_interval=15)
    world.nodes[ALL_NODES] = [NodeInfo(f"edge-cpu-{i}", {}) for i in range(4)]
    world.ready_pod = False
    world.reconcile()
    old = world.kube.objects[("DaemonSet", "edge", "digits-cpu")]["spec"]["template"]["metadata"]["labels"][
        TEMPLATE_LABEL]
    world.edit(model={"sha256": SHA_B, "version": "4"}, **spec)
    world.reconcile()
    new = world.kube.objects[("DaemonSet", "edge", "digits-cpu")]["spec"]["template"]["metadata"]["labels"][
        TEMPLATE_LABEL]
    world.extra_pods = [old_pod(f"edge-cpu-{i}", old) for i in range(4)]
    world.refresh(cpu=(4, 4, 0))
    world.resync()
    assert pod_deletions(world) == ["old-edge-cpu-0"], "the canary"

    # Its successor waits for the scheduler; then the scheduler finds no room, which moves no count.
    canary = old_pod("edge-cpu-0", new, ready=False, name="new")
    world.extra_pods[0] = canary
    world.refresh(cpu=(4, 3, 1))
    now[0] = 1
    world.resync()
    assert world.kube.objects[MODEL]["status"]["rollout"]["state"] == "RollingOut"
    canary["status"]["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                           "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."})
    world.refresh()
    now[0] = 16
    world.kube.calls.clear()
    world.resync()
    rollout = world.kube.objects[MODEL]["status"]["rollout"]
    assert (rollout["state"], rollout["reason"]) == ("Halted", "Unschedulable")
    assert "new-edge-cpu-0 on node edge-cpu-0 (cpu): 0/4 nodes are available" in rollout["message"]
    assert pod_deletions(world) == []
    assert ("Warning", "RolloutHalted") in world.events
    assert [c for c in world.kube.calls if c[0] == "list"] == [("list", "pods", CPU_PODS)], "one list, not two"
