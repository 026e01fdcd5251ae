"""The FederatedRound sync against an in-memory stand-in for the API server, Kopf's indexes and the
aggregator's status endpoint: what it creates, when it promotes, and what it leaves alone."""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from edgeloop import certs, config
from edgeloop.aggregator import AggregatorUnreachable
from edgeloop.handlers.certificates import Certificates
from edgeloop.handlers.federatedround import FederatedRounds
from edgeloop.handlers.shared import ALL_NODES
from edgeloop.kube import KubeError
from edgeloop.nodes import NodeInfo
from edgeloop.render.certificates import decode
from edgeloop.status.diagnosis import RoundPod
from edgeloop.status.federatedround import JobState, parse_report
from edgeloop.testing import FakeKube
from fr_factories import SHA_TRAINED, report
from im_factories import SHA_A, SHA_B, inference_model, node

KEY = ("edge", "r1")
ROUND = ("FederatedRound", *KEY)
MODEL = ("InferenceModel", "edge", "digits")
AGGREGATOR_LABELS = {"edgeloop.io/federatedround": "r1", "edgeloop.io/role": "aggregator"}
STATUS_URL = "https://r1-aggregator.edge.svc:8080/v1/status"  # TLS by default


def federated_round(**spec_override):
    spec = {
        "modelRef": {"name": "digits"},
        "dataset": {"name": "digits"},
        "participants": {"minClients": 2, "maxClients": 3},
        **spec_override,
    }
    return {
        "apiVersion": "edgeloop.io/v1alpha1",
        "kind": "FederatedRound",
        "metadata": {"name": "r1", "namespace": "edge", "uid": "uid-r1", "generation": 1},
        "spec": spec,
    }


class World:
    """The operator's view: Kopf indexes as plain dicts, refreshed from the fake API server."""

    def __init__(self, nodes=("edge-a", "edge-b", "edge-c", "edge-d"), body=None, operator_config=None):
        self.kube = FakeKube()
        self.kube.put(body or federated_round())
        self.kube.put(inference_model())
        self.rounds, self.jobs, self.services, self.secrets, self.pods = {}, {}, {}, {}, {}
        self.pod_objects: list[dict] = []  # the round's pods, as the watch shows them
        self.nodes = {ALL_NODES: [NodeInfo.from_object(node(name)) for name in nodes]}
        self.namespaces = {KEY[0]: [True]}
        self.report: dict | None = None  # what GET /v1/status answers; None: unreachable
        self.events: list[tuple] = []
        self.polled_tls = None  # the client certificate the last poll presented
        operator_config = operator_config or config.build()
        self.status_url = STATUS_URL if operator_config.tls.enabled else STATUS_URL.replace("https", "http")
        self.controller = FederatedRounds(
            config=operator_config,
            kube=self.kube,
            rounds=self.rounds,
            jobs=self.jobs,
            services=self.services,
            nodes=self.nodes,
            pods=self.pods,
            namespaces=self.namespaces,
            coalesce_seconds=0,
            read_report=self.read_report,
            post_event=lambda body, **e: self.events.append((body["kind"], e["type"], e["reason"])),
            tls=Certificates(operator_config.tls, self.kube, self.secrets),
        )
        self.refresh()

    def read_report(self, url, tls):
        assert url == self.status_url
        self.polled_tls = tls
        if self.report is None:
            raise AggregatorUnreachable(f"GET {url}: connection refused")
        return parse_report(json.dumps(self.report))

    def refresh(self, finished: dict[str, str] | None = None):
        """Let the watches catch up; `finished` sets Job conditions by name."""
        self.rounds[KEY] = [copy.deepcopy(self.kube.objects[ROUND])]
        for (kind, _, name), obj in self.kube.objects.items():
            if kind == "Job" and name in (finished or {}):
                obj["status"] = {
                    "conditions": [{"type": finished[name], "status": "True", "reason": "", "message": ""}]
                }
        self.secrets.clear()
        self.secrets.update(
            {("edge", name): [copy.deepcopy(o)] for (kind, _, name), o in self.kube.objects.items() if kind == "Secret"}
        )
        self.jobs[KEY] = [JobState.from_object(o) for (kind, _, _), o in self.kube.objects.items() if kind == "Job"]
        self.services[KEY] = [
            (o["metadata"]["name"], o["metadata"]["ownerReferences"][0]["uid"])
            for (kind, _, _), o in self.kube.objects.items()
            if kind == "Service"
        ]
        self.pods[KEY] = [RoundPod.from_object(pod) for pod in self.pod_objects]

    def sync(self):
        asyncio.run(self.controller.runner.run(KEY))
        self.refresh()

    @property
    def status(self):
        return self.kube.objects[ROUND].get("status", {})

    def conditions(self, *types):
        """By type, (status, reason), by default of all but Degraded (stuck pods, tested apart)."""
        types = types or ("Started", "Succeeded", "Promoted")
        return {c["type"]: (c["status"], c["reason"]) for c in self.status.get("conditions", []) if c["type"] in types}

    @property
    def model(self):
        return self.kube.objects[MODEL]["spec"]["model"]


def started_world(**kwargs) -> World:
    world = World(**kwargs)
    world.sync()
    world.kube.calls.clear()
    world.events.clear()
    return world


def test_start_creates_the_aggregator_first_then_its_service_and_one_client_per_selected_node():
    world = World()
    world.sync()
    applied = [c[1:] for c in world.kube.writes() if c[0] == "apply"]
    assert applied == [
        ("Secret", "edgeloop-ca"),
        ("Secret", "r1-aggregator-tls"),
        ("Secret", "r1-status-tls"),
        ("Secret", "r1-client-0-tls"),
        ("Secret", "r1-client-1-tls"),
        ("Secret", "r1-client-2-tls"),
        ("Job", "r1-aggregator"),
        ("Service", "r1-aggregator"),
        ("Job", "r1-client-0"),
        ("Job", "r1-client-1"),
        ("Job", "r1-client-2"),
    ]
    jobs = [world.kube.objects[("Job", "edge", f"r1-client-{i}")] for i in range(3)]
    pinned = [job["metadata"]["annotations"]["edgeloop.io/node"] for job in jobs]
    assert pinned == ["edge-a", "edge-b", "edge-c"], "the first maxClients by name"
    assert world.status["phase"] == "Running" and world.status["participants"]["nodes"] == pinned
    assert world.status["baseModel"] == {"sha256": SHA_A, "version": "3"}
    assert world.conditions()["Started"] == ("True", "JobsCreated")
    assert ("FederatedRound", "Normal", "Started") in world.events


def test_a_round_in_a_namespace_being_deleted_is_forgotten_without_a_call():
    """Kopf stops watching a namespace being deleted before the deletions of its objects reach the
    indexes: the round stays indexed, but its namespace is gone from the index of namespaces."""
    world = started_world()
    del world.namespaces[KEY[0]]
    world.kube.calls.clear()
    world.polled_tls = None
    world.sync()
    assert world.kube.calls == [] and world.polled_tls is None, "no status written, no aggregator polled"


def test_too_few_nodes_waits_without_calls_and_starts_when_a_node_arrives():
    world = World(nodes=("edge-a",))
    world.sync()
    assert world.kube.writes() == [("patch_status", "federatedrounds", "r1")]
    assert world.status["phase"] == "Pending"
    assert world.conditions()["Started"] == ("False", "NotEnoughNodes")
    world.kube.calls.clear()
    world.sync()
    assert world.kube.calls == [], "waiting reads only the node index"

    world.nodes[ALL_NODES].append(NodeInfo.from_object(node("edge-b")))

    async def node_event():  # what the node watch does: a sync soon of every round waiting for nodes
        world.controller.nodes_changed()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if world.status["phase"] != "Pending":
                return

    asyncio.run(node_event())
    world.refresh()
    assert world.status["phase"] == "Running"
    assert world.status["participants"]["nodes"] == ["edge-a", "edge-b"]


def test_a_missing_inference_model_waits():
    world = World()
    del world.kube.objects[MODEL]
    world.sync()
    assert world.conditions()["Started"] == ("False", "InferenceModelNotFound")
    assert not [c for c in world.kube.writes() if c[0] == "apply"]


def test_an_explicit_model_needs_no_inference_model():
    explicit = {"uri": f"http://store/sha256/{SHA_B}", "sha256": SHA_B, "version": "7"}
    world = World(body=federated_round(modelRef=None, model=explicit))
    del world.kube.objects[ROUND]["spec"]["modelRef"]
    world.refresh()
    world.sync()
    args = world.kube.objects[("Job", "edge", "r1-aggregator")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model-sha256") + 1] == SHA_B
    assert world.status["baseModel"] == {"sha256": SHA_B, "version": "7"}


def test_live_reports_update_the_status_and_an_unchanged_one_writes_nothing():
    world = started_world()
    world.report = report()
    world.sync()
    assert (world.status["round"], world.status["progress"], world.status["stage"]) == (2, "2/5", "collect")
    assert world.status["participants"]["reported"] == 2
    world.kube.calls.clear()
    world.sync()
    assert world.kube.calls == [], "no write, and the status endpoint is no API call"


def test_success_promotes_by_a_conditional_merge_patch_of_only_the_model_fields():
    world = started_world()
    world.report = report("Succeeded")
    resource_version = world.kube.objects[MODEL]["metadata"]["resourceVersion"]
    world.sync()
    [patch] = [c for c in world.kube.writes() if c[0] == "merge_patch"]
    assert patch[1:3] == ("inferencemodels", "digits")
    assert patch[3] == {
        "metadata": {"resourceVersion": resource_version},
        "spec": {"model": {"uri": report("Succeeded")["result"]["uri"], "sha256": SHA_TRAINED, "version": "4"}},
    }
    assert world.model["sha256"] == SHA_TRAINED
    assert world.status["phase"] == "Succeeded" and world.status["promoted"] is True
    assert world.status["result"]["version"] == "4"
    assert ("InferenceModel", "Normal", "Promoted") in world.events
    assert ("FederatedRound", "Normal", "Promoted") in world.events

    world.kube.calls.clear()
    world.report = None
    for _ in range(3):
        world.sync()
        asyncio.run(world.controller.reconcile(world.rounds[KEY][0]))  # as on an operator restart
    assert world.kube.calls == [], "a decided round is never looked at again"


def test_a_model_below_the_gate_is_published_but_not_promoted():
    world = started_world(body=federated_round(promote={"minAccuracy": 0.99}))
    world.report = report("Succeeded")
    world.sync()
    assert not [c for c in world.kube.calls if c[0] in ("merge_patch", "get") and c[1] == "inferencemodels"]
    assert world.model["sha256"] == SHA_A
    assert world.conditions()["Promoted"] == ("False", "BelowMinAccuracy")
    assert world.status["result"]["sha256"] == SHA_TRAINED


def test_an_inference_model_that_moved_on_is_left_alone():
    world = started_world()
    world.model.update(sha256=SHA_B, version="9")
    world.report = report("Succeeded")
    world.sync()
    assert not [c for c in world.kube.writes() if c[0] == "merge_patch"]
    assert world.conditions()["Promoted"] == ("False", "InferenceModelChanged")
    assert world.model["sha256"] == SHA_B


def test_a_conflicting_write_is_retried_and_then_promotes():
    world = started_world()
    world.report = report("Succeeded")
    real_get = world.kube.get

    def stale_get(kind, namespace, name):  # someone else writes the InferenceModel in between
        found = real_get(kind, namespace, name)
        world.kube.objects[MODEL]["metadata"]["resourceVersion"] += "1"
        return found

    world.kube.get = stale_get
    with pytest.raises(KubeError) as error:
        asyncio.run(world.controller.runner.run(KEY))
    assert error.value.status == 409 and "status" not in world.status
    world.kube.get = real_get
    world.sync()
    assert world.status["promoted"] is True and world.model["sha256"] == SHA_TRAINED


def test_a_promotion_done_before_a_restart_is_recognised_without_patching_again():
    world = started_world()
    world.model.update(sha256=SHA_TRAINED, version="4")  # patched; the status write was lost
    world.report = report("Succeeded")
    world.sync()
    assert not [c for c in world.kube.writes() if c[0] == "merge_patch"]
    assert world.conditions()["Promoted"] == ("True", "Promoted")


def test_a_finished_aggregator_missed_by_the_polls_is_read_from_its_log():
    world = started_world()
    aggregator = world.kube.objects[("Job", "edge", "r1-aggregator")]
    world.kube.pods = [
        {
            "metadata": {
                "name": name,
                "labels": AGGREGATOR_LABELS,
                "creationTimestamp": stamp,
                "ownerReferences": [{"uid": aggregator["metadata"]["uid"]}],
            }
        }
        for name, stamp in (
            ("r1-aggregator-old", "2026-11-28T10:00:00Z"),
            ("r1-aggregator-new", "2026-11-28T10:05:00Z"),
        )
    ]
    world.kube.log = "…\n" + json.dumps(report("Succeeded")) + "\n"
    world.refresh(finished={"r1-aggregator": "Complete"})
    world.sync()
    assert ("log_tail", "r1-aggregator-new", "aggregator", 1) in world.kube.calls
    assert world.status["phase"] == "Succeeded" and world.status["promoted"] is True


def test_an_unreadable_log_leaves_the_round_awaiting_its_report():
    world = started_world()
    world.kube.pods = [
        {"metadata": {"name": "p", "labels": AGGREGATOR_LABELS, "creationTimestamp": "x",
                      "ownerReferences": [{"uid": "uid-Job-r1-aggregator"}]}}
    ]
    world.kube.log = KubeError(502, "no kubelet")
    world.refresh(finished={"r1-aggregator": "Complete"})
    world.sync()
    assert world.status["phase"] == "Running"
    assert world.conditions()["Succeeded"] == ("Unknown", "AwaitingReport")
    assert "no kubelet" in next(c["message"] for c in world.status["conditions"] if c["type"] == "Succeeded")


def test_a_deleted_client_job_is_recreated_and_existing_jobs_are_never_reapplied():
    world = started_world()
    del world.kube.objects[("Job", "edge", "r1-client-1")]
    world.refresh()
    world.sync()
    assert [c for c in world.kube.writes() if c[0] == "apply"] == [("apply", "Job", "r1-client-1")]
    assert world.kube.objects[("Job", "edge", "r1-client-1")]["metadata"]["annotations"]["edgeloop.io/node"] == "edge-b"


def test_a_round_started_but_not_yet_in_the_index_is_not_started_again():
    world = started_world()
    world.nodes[ALL_NODES] = [NodeInfo.from_object(node(n)) for n in ("edge-x", "edge-y")]  # the fleet changed
    world.jobs[KEY] = []  # the watch lags behind
    world.services[KEY] = []
    asyncio.run(world.controller.runner.run(KEY))
    assert ("get", "jobs", "r1-aggregator") in world.kube.calls
    assert ("apply", "Job", "r1-aggregator") not in world.kube.calls
    assert world.kube.objects[("Job", "edge", "r1-client-0")]["metadata"]["annotations"]["edgeloop.io/node"] == "edge-a"


def test_jobs_of_an_earlier_round_of_the_same_name_are_not_this_rounds():
    world = started_world()
    world.kube.objects[ROUND]["metadata"]["uid"] = "uid-r1-again"  # deleted and recreated
    del world.kube.objects[ROUND]["status"]
    world.refresh()
    world.sync()
    assert world.conditions()["Started"] == ("False", "PreviousRoundNotGone")
    assert not [c for c in world.kube.writes() if c[0] == "apply"]


def test_a_running_round_whose_aggregator_job_was_deleted_fails_and_is_not_started_again():
    world = started_world()
    world.report = report()
    world.sync()
    del world.kube.objects[("Job", "edge", "r1-aggregator")]
    world.refresh()
    world.kube.calls.clear()
    world.sync()
    assert world.kube.calls[0] == ("get", "jobs", "r1-aggregator")
    assert not [c for c in world.kube.writes() if c[0] == "apply"]
    assert world.status["phase"] == "Failed"
    assert world.conditions() == {
        "Started": ("True", "JobsCreated"),
        "Succeeded": ("False", "AggregatorDeleted"),
        "Promoted": ("False", "RoundFailed"),
    }
    assert world.status["round"] == 2, "what was reported stays"


@pytest.mark.parametrize("claim", [None, "edgeloop-datasets"])
def test_a_dataset_outside_the_namespaces_directory_fails_the_round_without_creating_anything(claim):
    claimed = config.build({"datasetClaim": claim})
    other = "/var/lib/edgeloop/data/other-tenant/digits"
    world = World(body=federated_round(dataset={"hostPath": other}), operator_config=claimed)
    world.sync()
    assert not [c for c in world.kube.writes() if c[0] == "apply"]
    assert world.status["phase"] == "Failed"
    assert world.conditions() == {
        "Started": ("False", "DatasetOutsideRoot"),
        "Succeeded": ("False", "DatasetOutsideRoot"),
        "Promoted": ("False", "RoundFailed"),
    }
    message = {c["type"]: c["message"] for c in world.status["conditions"]}["Succeeded"]
    assert f"{other} is not under /var/lib/edgeloop/data/edge/" in message
    world.kube.calls.clear()
    world.sync()
    assert world.kube.calls == [], "a failed round is done: no retries"


def test_with_a_dataset_claim_a_dataset_under_the_root_starts():
    world = World(operator_config=config.build({"datasetClaim": "edgeloop-datasets"}))
    world.sync()
    client = world.kube.objects[("Job", "edge", "r1-client-0")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in client["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "edgeloop-datasets"
    assert world.conditions()["Started"] == ("True", "JobsCreated")


def test_a_round_deleted_during_a_sync_is_not_an_error():
    world = started_world()
    world.report = report()
    del world.kube.objects[ROUND]  # after the watch showed it: patch_status answers None (404)
    asyncio.run(world.controller.runner.run(KEY))
    assert world.events == []


# ---- TLS


def secret(world: World, name: str) -> dict:
    return world.kube.objects[("Secret", "edge", name)]


def common_name(cert: x509.Certificate) -> str:
    [name] = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return name.value


def test_the_certificates_are_issued_before_the_jobs_one_per_client_named_for_its_node_and_owned_by_the_round():
    """The aggregator takes a client's id from its certificate's CN (C5): one certificate per client Job."""
    world = World()
    world.sync()
    applied = [c[1:] for c in world.kube.writes() if c[0] == "apply"]
    assert applied.index(("Secret", "r1-client-2-tls")) < applied.index(("Job", "r1-aggregator"))
    ca = certs.load_cert(decode(secret(world, "edgeloop-ca"), "tls.crt"))
    server = certs.load_cert(decode(secret(world, "r1-aggregator-tls"), "tls.crt"))
    clients = {i: certs.load_cert(decode(secret(world, f"r1-client-{i}-tls"), "tls.crt")) for i in range(3)}
    status = certs.load_cert(decode(secret(world, "r1-status-tls"), "tls.crt"))
    assert all(certs.signed_by(cert, ca) for cert in [server, status, *clients.values()])
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert names == certs.service_dns_names("r1-aggregator", "edge")
    assert {i: common_name(cert) for i, cert in clients.items()} == {0: "edge-a", 1: "edge-b", 2: "edge-c"}
    assert common_name(status) == "edgeloop:operator", "no node can be named so (a ':' is not in a node name)"
    usages = {
        name: list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        for name, c in (("server", server), ("status", status), *((i, c) for i, c in clients.items()))
    }
    assert usages.pop("server") == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert all(usage == [ExtendedKeyUsageOID.CLIENT_AUTH] for usage in usages.values())
    for name in ("r1-aggregator-tls", "r1-status-tls", "r1-client-0-tls"):
        [owner] = secret(world, name)["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("FederatedRound", "r1", "uid-r1"), "goes with it"
        assert secret(world, name)["metadata"]["labels"]["edgeloop.io/federatedround"] == "r1"
    aggregator = world.kube.objects[("Job", "edge", "r1-aggregator")]["spec"]["template"]["spec"]
    assert {v["name"]: v.get("secret", {}).get("secretName") for v in aggregator["volumes"]}["tls"] == (
        "r1-aggregator-tls"
    )
    for i in range(3):
        client_job = world.kube.objects[("Job", "edge", f"r1-client-{i}")]["spec"]["template"]["spec"]
        assert {v["name"]: v.get("secret", {}).get("secretName") for v in client_job["volumes"]}["tls"] == (
            f"r1-client-{i}-tls"
        )


def test_valid_certificates_cost_no_call_and_no_write():
    world = started_world()
    world.sync()
    assert not [c for c in world.kube.calls if c[0] in ("apply", "get")], world.kube.calls


def test_a_certificate_due_for_rotation_is_renewed_by_the_sync_of_a_running_round():
    world = started_world()
    before = decode(secret(world, "r1-client-1-tls"), "tls.crt")
    del world.kube.objects[("Secret", "edge", "r1-client-1-tls")]  # gone, as a certificate past rotation would be
    world.refresh()
    world.sync()
    assert [c for c in world.kube.writes() if c[0] == "apply"] == [("apply", "Secret", "r1-client-1-tls")]
    assert decode(secret(world, "r1-client-1-tls"), "tls.crt") != before


def test_the_status_poll_presents_the_operators_own_client_certificate_and_expects_the_services_name():
    world = started_world()
    world.report = report()
    world.sync()
    stored = secret(world, "r1-status-tls")
    assert world.polled_tls is not None
    assert (world.polled_tls.cert, world.polled_tls.key, world.polled_tls.ca) == (
        decode(stored, "tls.crt"),
        decode(stored, "tls.key"),
        decode(stored, "ca.crt"),
    )
    assert world.polled_tls.server_name == "r1-aggregator.edge.svc"


def test_with_tls_disabled_there_are_no_certificates_and_the_poll_is_plain_http():
    world = World(operator_config=config.build({"tls": {"mode": "disabled"}}))
    world.report = report()
    world.sync()
    world.sync()
    assert not [c for c in world.kube.writes() if c[1] == "Secret"]
    assert world.polled_tls is None
    args = world.kube.objects[("Job", "edge", "r1-client-0")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--aggregator") + 1] == "http://r1-aggregator.edge.svc:8080"


def test_in_cert_manager_mode_the_rounds_certificates_owned_by_it_come_before_the_jobs():
    tls = {"mode": "cert-manager", "issuer": {"name": "ca", "kind": "ClusterIssuer"}}
    world = World(operator_config=config.build({"tls": tls}))
    world.sync()
    applied = [c[1:] for c in world.kube.writes() if c[0] == "apply"]
    assert applied[:5] == [("Certificate", name) for name in (
        "r1-aggregator-tls", "r1-status-tls", "r1-client-0-tls", "r1-client-1-tls", "r1-client-2-tls")]
    assert not [a for a in applied if a[0] == "Secret"], "cert-manager writes the Secrets"
    server = world.kube.objects[("Certificate", "edge", "r1-aggregator-tls")]["spec"]
    client = world.kube.objects[("Certificate", "edge", "r1-client-1-tls")]["spec"]
    assert server["dnsNames"] == certs.service_dns_names("r1-aggregator", "edge")
    assert "server auth" in server["usages"] and "client auth" in client["usages"] and "dnsNames" not in client
    assert client["commonName"] == "edge-b", "the client's id, its node"
    world.kube.calls.clear()
    world.sync()
    assert not [c for c in world.kube.writes() if c[0] == "apply"], "applied once per process and content"


def test_a_round_whose_image_is_outside_the_allowlist_fails_without_creating_anything():
    allowlist = config.build({"allowedImages": ["ghcr.io/edgeloop/*"]})
    world = World(body=federated_round(runtime={"image": "docker.io/evil/miner:1"}), operator_config=allowlist)
    world.sync()
    assert not [c for c in world.kube.writes() if c[0] == "apply"]
    assert world.status["phase"] == "Failed"
    assert world.conditions()["Succeeded"] == ("False", "ImageNotAllowed")


def test_a_round_of_a_model_served_as_tflite_fails_with_the_reason():
    """LiteRT serves tflite models; training needs an onnx one (admission refuses a tflite spec.model)."""
    world = World()
    world.kube.objects[MODEL]["spec"]["model"]["format"] = "tflite"
    world.sync()
    assert not [c for c in world.kube.writes() if c[0] == "apply"]
    assert world.status["phase"] == "Failed"
    assert world.conditions()["Started"] == ("False", "UnsupportedModelFormat")
    message = {c["type"]: c["message"] for c in world.status["conditions"]}["Succeeded"]
    assert "InferenceModel digits serves a tflite model" in message
# ---- stuck pods, seen within seconds


def round_pod(name: str, job: str, role: str, *, node: str = "edge-a", waiting: tuple[str, str] | None = None,
              last_exit: tuple[int, str] | None = None, scheduled_seconds_ago: float = 0) -> dict:
    """A pod of the round's Job `job` as the watch delivers it: waiting for a reason, or still being created."""
    scheduled = (datetime.now(UTC) - timedelta(seconds=scheduled_seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    state = {"waiting": {"reason": waiting[0], "message": waiting[1]}} if waiting else {
        "waiting": {"reason": "ContainerCreating"}}
    container = {"name": role, "ready": False, "state": state, "restartCount": 0}
    if last_exit:
        container["lastState"] = {"terminated": {"exitCode": last_exit[0], "message": last_exit[1]}}
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "labels": {"edgeloop.io/role": role},
                     "ownerReferences": [{"kind": "Job", "uid": f"uid-Job-{job}", "controller": True}]},
        "spec": {"nodeName": node},
        "status": {"phase": "Pending", "containerStatuses": [container],
                   "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled}]},
    }


def test_a_stuck_aggregator_pod_is_degraded_with_its_own_message_and_recovers():
    world = started_world()
    world.pod_objects = [round_pod("r1-aggregator-x", "r1-aggregator", "aggregator", waiting=(
        "ImagePullBackOff", 'Back-off pulling image "registry.example/edgeloop/runtime-federated:0.1.0"'))]
    world.refresh()
    world.sync()
    degraded = next(c for c in world.status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ImagePullFailed")
    assert degraded["message"] == ('the aggregator pod r1-aggregator-x on node edge-a: Back-off pulling image '
                                   '"registry.example/edgeloop/runtime-federated:0.1.0"')
    assert ("FederatedRound", "Warning", "ImagePullFailed") in world.events
    assert world.status["phase"] == "Running", "only diagnosed: a pull may succeed yet"

    world.pod_objects = []
    world.refresh()
    world.sync()
    assert world.conditions("Degraded") == {"Degraded": ("False", "AsExpected")}
    assert ("FederatedRound", "Normal", "Recovered") in world.events


@pytest.mark.parametrize(("pod", "reason", "message"), [
    (dict(waiting=("CreateContainerConfigError", 'secret "edgeloop-store-token" not found')),
     "ContainerCreateFailed", 'secret "edgeloop-store-token" not found'),
    (dict(waiting=("CrashLoopBackOff", "back-off 10s restarting failed container"),
          last_exit=(1, "ValueError: /data holds no .npz file")),
     "CrashLooping", "ValueError: /data holds no .npz file"),
])
def test_a_stuck_client_pod_is_named_with_its_node_and_reason(pod, reason, message):
    world = started_world()
    world.pod_objects = [round_pod("r1-client-1-y", "r1-client-1", "client", node="edge-b", **pod)]
    world.refresh()
    world.sync()
    degraded = next(c for c in world.status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == reason
    assert degraded["message"] == f"the client pod r1-client-1-y on node edge-b: {message}"


def test_a_pod_that_cannot_mount_its_volumes_is_told_by_the_kubelets_event():
    world = started_world()
    world.pod_objects = [
        round_pod("r1-client-0-a", "r1-client-0", "client", scheduled_seconds_ago=1),
        round_pod("r1-client-2-c", "r1-client-2", "client", node="edge-c", scheduled_seconds_ago=30),
    ]
    world.kube.events = [{"reason": "FailedMount", "lastTimestamp": "2026-12-01T10:00:00Z",
                          "message": 'MountVolume.SetUp failed for volume "data" : hostPath type check failed: '
                                     "/var/lib/edgeloop/data/digits is not a directory"}]
    world.refresh()
    world.kube.calls.clear()
    world.sync()
    degraded = next(c for c in world.status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "MountFailed"
    assert degraded["message"].startswith("the client pod r1-client-2-c on node edge-c: MountVolume.SetUp failed")
    events_listed = [c for c in world.kube.calls if c[:2] == ("list", "events")]
    assert events_listed == [("list", "events", "involvedObject.uid=uid-r1-client-2-c,reason=FailedMount")], (
        "only the pod that has waited past the grace")


def test_pods_of_an_earlier_round_of_the_same_name_are_not_this_rounds():
    world = started_world()
    world.pod_objects = [round_pod("r1-aggregator-old", "gone", "aggregator", waiting=("ErrImagePull", "no"))]
    world.refresh()
    world.sync()
    assert world.conditions("Degraded") == {"Degraded": ("False", "AsExpected")}
