"""kubectl edgeloop: rows from the pods the operator renders, what their runtimes say through the pod proxy
(the runtime's own metrics text), and kubectl-like output."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import yaml
from edgeloop import config
from edgeloop.kube import KubeError
from edgeloop.kubectl_plugin import (
    NODE_COLUMNS,
    NODE_WIDE,
    Histogram,
    Plugin,
    age,
    histogram,
    node_row,
    observed,
    output,
    quantile,
    round_columns,
    round_row,
    runtime_args,
)
from edgeloop.render.inferencemodel import owner_of, render
from edgeloop.testing import FakeKube
from edgeloop_runtime.metrics import Metrics
from im_factories import SHA_A, spec

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def rendered_pod(accelerator: str, node: str, *, tls: bool = True, ready: bool = True, restarts: int = 0) -> dict:
    """A pod of the DaemonSet the operator renders for the example model, as the API server returns it."""
    operator_config = config.build() if tls else config.build({"tls": {"mode": "disabled"}})
    manifests = render(owner_of("digits", "edge", "uid-digits"), spec(), operator_config)
    template = manifests.daemon_sets[f"digits-{accelerator}"]["spec"]["template"]
    return {
        "metadata": {
            "name": f"digits-{accelerator}-{node}",
            "namespace": "edge",
            "uid": f"uid-{node}",
            "labels": template["metadata"]["labels"],
            "creationTimestamp": "2026-12-01T11:00:00Z",
        },
        "spec": {**template["spec"], "nodeName": node},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": "runtime", "ready": ready, "restartCount": restarts, "state": {"running": {}}}
            ],
        },
    }


def runtime_labels(protocol: str) -> tuple[str, ...]:
    """The runtime latency histogram's label values: its labels are (model, version, protocol)."""
    return ("digits", "3", protocol)


class Runtimes(FakeKube):
    """Runtimes behind the pod proxy: their real metrics text, with `per_read` requests served between reads."""

    def __init__(self, per_read: int = 100, seconds: float = 0.004):
        super().__init__()
        self.metrics: dict[str, Metrics] = {}
        self.per_read, self.seconds = per_read, seconds
        self.denied: set[str] = set()

    def proxy_get(self, namespace: str, pod: str, port: int, path: str, *, https: bool) -> str:
        self.calls.append(("proxy_get", pod, path, port, https))
        if pod in self.denied:
            raise KubeError(403, f'pods "{pod}" is forbidden: cannot get resource "pods/proxy"')
        runtime = self.metrics.setdefault(pod, Metrics("digits", "3", SHA_A, ["CPUExecutionProvider"]))
        if path == "/v2/models/digits":
            return json.dumps({"name": "digits", "parameters": {"execution_providers": "CPUExecutionProvider"}})
        assert path == "/metrics"
        for _ in range(self.per_read):
            runtime.latency.observe(self.seconds, *runtime_labels("http"))
        return runtime.render().decode()


def test_a_rendered_pod_tells_its_version_digest_port_and_scheme():
    args = runtime_args(rendered_pod("gpu", "edge-gpu-0"))
    assert (args["model-version"], args["sha256"], args["http-port"], args["model-name"]) == (
        "3",
        SHA_A,
        "8000",
        "digits",
    )
    assert "tls-cert" in args and "tls-cert" not in runtime_args(rendered_pod("gpu", "edge-gpu-0", tls=False))
    row = node_row(rendered_pod("gpu", "edge-gpu-0", ready=False, restarts=2))
    assert (row["node"], row["variant"], row["status"], row["restarts"]) == (
        "edge-gpu-0",
        "gpu",
        "Running (not ready)",
        2,
    )


def test_nodes_asks_each_runtime_through_the_pod_proxy():
    kube = Runtimes()
    kube.pods = [rendered_pod("gpu", "edge-gpu-0"), rendered_pod("cpu", "edge-cpu-0", tls=False)]
    warnings = []
    rows = Plugin(kube, warnings.append).nodes("edge", "digits", window=0.05)
    assert [(r["node"], r["variant"], r["providers"]) for r in rows] == [
        ("edge-cpu-0", "cpu", ["CPUExecutionProvider"]),
        ("edge-gpu-0", "gpu", ["CPUExecutionProvider"]),
    ]
    for row in rows:
        # 100 requests of 4 ms between the two reads: the rate over the window, the p99 within the 2.5-5 ms bucket.
        assert 100 / 5 < row["requestsPerSecond"] <= 100 / 0.05
        assert 0.0025 < row["p99Seconds"] <= 0.005
    assert {(c[1], c[3], c[4]) for c in kube.calls if c[0] == "proxy_get"} == {
        ("digits-gpu-edge-gpu-0", 8000, True),
        ("digits-cpu-edge-cpu-0", 8000, False),
    }
    selector = "app.kubernetes.io/name=edgeloop-runtime,app.kubernetes.io/component=inference,"
    assert ("list", "pods", selector + "edgeloop.io/inferencemodel=digits") in kube.calls and not warnings


def test_without_pods_proxy_the_rows_stay_and_say_so():
    kube = Runtimes()
    kube.pods = [rendered_pod("gpu", "edge-gpu-0")]
    kube.denied = {"digits-gpu-edge-gpu-0"}
    warnings = []
    [row] = Plugin(kube, warnings.append).nodes("edge", None, window=0.05)
    assert (row["version"], row["providers"], row["requestsPerSecond"], row["p99Seconds"]) == ("3", [], None, None)
    assert "forbidden" in row["runtime"] and "pods/proxy" in warnings[0]
    text = output([row], "", NODE_COLUMNS, NODE_WIDE, False, "nodes", "edge")
    assert text.splitlines()[1].split()[-5:] == ["-", "Running", "0", "-", "-"]


def test_an_idle_runtime_has_no_p99_and_a_pending_pod_is_not_asked():
    kube = Runtimes(per_read=0)
    pending = rendered_pod("cpu", "edge-cpu-0")
    pending["status"] = {
        "phase": "Pending",
        "initContainerStatuses": [{"name": "fetch", "state": {"waiting": {"reason": "ImagePullBackOff"}}}],
    }
    kube.pods = [rendered_pod("gpu", "edge-gpu-0"), pending]
    rows = {r["variant"]: r for r in Plugin(kube, print).nodes("edge", None, window=0.01)}
    assert (rows["gpu"]["requestsPerSecond"], rows["gpu"]["p99Seconds"]) == (0, None)
    assert rows["cpu"]["status"] == "ImagePullBackOff"
    assert not [c for c in kube.calls if c[0] == "proxy_get" and c[1] == pending["metadata"]["name"]]


def test_quantile_interpolates_as_histogram_quantile():
    before = Histogram((0.001, 0.01, float("inf")), (5, 5, 5))
    after = Histogram((0.001, 0.01, float("inf")), (55, 105, 105))  # 50 below 1 ms, 50 in (1, 10] ms
    assert quantile(0.5, observed(before, after)) == pytest.approx(0.001)
    assert quantile(0.99, observed(before, after)) == pytest.approx(0.001 + 0.009 * (99 - 50) / 50)
    assert quantile(0.99, observed(after, after)) is None
    slow = Histogram((0.001, float("inf")), (0, 10))
    assert quantile(0.99, slow) == 0.001, "beyond the last finite bound: that bound"
    restarted = Histogram((0.001, 0.01, float("inf")), (1, 2, 2))
    assert observed(after, restarted) == restarted, "a restarted runtime counts from zero"
    assert quantile(0.5, restarted) == pytest.approx(0.001)


def test_histogram_adds_up_the_protocols():
    runtime = Metrics("digits", "3", SHA_A, ["CPUExecutionProvider"])
    runtime.latency.observe(0.002, *runtime_labels("http"))
    runtime.latency.observe(0.002, *runtime_labels("grpc"))
    assert histogram(runtime.render().decode()).total == 2


def test_output_is_aligned_like_kubectl_and_machine_readable():
    rows = [node_row(rendered_pod("gpu", "edge-gpu-0")), node_row(rendered_pod("cpu", "a-much-longer-node-name"))]
    lines = output(rows, "", NODE_COLUMNS, NODE_WIDE, True, "nodes", "").splitlines()
    assert lines[0].split() == [
        "NAMESPACE",
        "NODE",
        "MODEL",
        "VARIANT",
        "VERSION",
        "DIGEST",
        "PROVIDERS",
        "STATUS",
        "RESTARTS",
        "REQ/S",
        "P99",
    ]
    assert len({line.index("MODEL") if i == 0 else line.index("digits") for i, line in enumerate(lines)}) == 1
    assert output(rows, "wide", NODE_COLUMNS, NODE_WIDE, False, "nodes", "edge").splitlines()[0].split()[-2:] == [
        "POD",
        "SHA256",
    ]
    assert (
        json.loads(output(rows, "json", NODE_COLUMNS, NODE_WIDE, False, "nodes", "edge"))["items"][0]["sha256"] == SHA_A
    )
    assert yaml.safe_load(output(rows, "yaml", NODE_COLUMNS, NODE_WIDE, False, "nodes", "edge"))["kind"] == "List"
    assert output([], "", NODE_COLUMNS, NODE_WIDE, False, "nodes", "edge") == "No nodes found in edge namespace.\n"


def test_rounds_show_accuracy_to_three_significant_digits():
    body = {
        "metadata": {"namespace": "edge", "name": "digits-round-1", "creationTimestamp": "2026-12-01T11:55:00Z"},
        "spec": {"modelRef": {"name": "digits"}},
        "status": {
            "phase": "Succeeded",
            "progress": "3/3",
            "promoted": True,
            "participants": {"selected": 2, "reported": 2, "dropped": 0},
            "baseline": {"accuracy": 0.0974, "loss": 2.3},
            "metrics": {"accuracy": 0.9722222222222222},
            "result": {"version": "2"},
        },
    }
    pending = {"metadata": {"namespace": "edge", "name": "later"}, "spec": {}}
    text = output([round_row(body), round_row(pending)], "", round_columns(NOW), [], False, "rounds", "edge")
    header, first, second = text.splitlines()
    assert header.split() == ["NAME", "MODEL", "PHASE", "ROUND", "CLIENTS", "BASELINE", "ACCURACY", "PROMOTED", "AGE"]
    assert first.split() == ["digits-round-1", "digits", "Succeeded", "3/3", "2/2", "0.0974", "0.972", "true", "5m"]
    assert second.split() == ["later", "-", "Pending", "-", "0/0", "-", "-", "false", "-"]


@pytest.mark.parametrize(
    ("created", "shown"),
    [
        ("2026-12-01T11:59:00Z", "60s"),
        ("2026-12-01T11:00:00Z", "60m"),
        ("2026-11-30T12:00:00Z", "24h"),
        ("2026-11-01T12:00:00Z", "30d"),
    ],
)
def test_age_as_kubectl_rounds_it(created, shown):
    assert age(created, NOW) == shown
