"""The chart's monitoring: scrape annotations, Prometheus Operator objects only where the API is (or when
asked), their selectors matching the pods the operator renders, and a dashboard whose every query reads
metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from edgeloop import config, metrics
from test_chart import CHART, by_kind, env_of, helm, needs_helm, one, operator_args, rendered_daemon_set, template

MONITORING_API = (
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)


def with_api(*sets: str) -> list[dict]:
    """helm template as for a cluster that serves the Prometheus Operator's API."""
    args = ["template", "edgeloop", str(CHART), "--namespace", "edgeloop-system"]
    for api in MONITORING_API:
        args += ["--api-versions", api]
    for value in sets:
        args += ["--set", value]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def kinds(docs: list[dict]) -> set[str]:
    return {doc["kind"] for doc in docs}


@needs_helm
def test_the_operator_serves_metrics_and_says_so_by_annotation(monkeypatch):
    docs = template()
    pod = one(docs, "Deployment", "edgeloop-operator")["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert operator_args(container, monkeypatch).metrics_port == 9090
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    annotations = pod["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == ("true", "9090")
    off = one(template("monitoring.metricsPort=0"), "Deployment", "edgeloop-operator")["spec"]["template"]
    assert "prometheus.io/scrape" not in off["metadata"]["annotations"]
    assert env_of(off["spec"]["containers"][0])["EDGELOOP_METRICS_PORT"] == "0"


@pytest.mark.parametrize("tls", [True, False])
def test_the_runtime_pods_the_operator_renders_carry_scrape_annotations(tls):
    operator_config = config.build() if tls else config.build({"tls": {"mode": "disabled"}})
    pod = rendered_daemon_set(operator_config)["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    [http] = [p for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "http"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(http["containerPort"])
    assert annotations["prometheus.io/scheme"] == ("https" if tls else "http")


@needs_helm
def test_prometheus_operator_objects_only_where_the_api_is():
    assert not kinds(template()) & {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    assert {"PodMonitor", "PrometheusRule"} <= kinds(with_api()) and "ServiceMonitor" not in kinds(with_api())
    assert {"PodMonitor", "PrometheusRule"} <= kinds(
        template("monitoring.podMonitor.enabled=true", "monitoring.prometheusRule.enabled=true")
    )
    assert not kinds(with_api("monitoring.podMonitor.enabled=false", "monitoring.prometheusRule.enabled=false")) & {
        "PodMonitor",
        "PrometheusRule",
    }


@needs_helm
def test_pod_monitors_select_the_operator_and_the_rendered_runtime_pods():
    docs = with_api("watchNamespaces={edge-a}", "monitoring.podMonitor.labels.release=kube-prometheus-stack")
    operator_pod = one(docs, "Deployment", "edgeloop-operator")["spec"]["template"]
    operator_monitor = one(docs, "PodMonitor", "edgeloop-operator")
    assert operator_monitor["spec"]["selector"]["matchLabels"].items() <= operator_pod["metadata"]["labels"].items()
    assert operator_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert operator_monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"], "a model's namespace, not the pod's"
    assert operator_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    runtime_monitor = one(docs, "PodMonitor", "edgeloop-runtime")["spec"]
    assert runtime_monitor["namespaceSelector"] == {"matchNames": ["edge-a"]}
    pod = rendered_daemon_set(config.build())["spec"]["template"]
    assert runtime_monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [endpoint] = runtime_monitor["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert (endpoint["path"], endpoint["scheme"], endpoint["tlsConfig"]) == (
        "/metrics",
        "https",
        {"insecureSkipVerify": True},
    )
    plain = one(with_api("tls.mode=disabled"), "PodMonitor", "edgeloop-runtime")["spec"]["podMetricsEndpoints"][0]
    assert "scheme" not in plain and "tlsConfig" not in plain
    assert one(with_api(), "PodMonitor", "edgeloop-runtime")["spec"]["namespaceSelector"] == {"any": True}


@needs_helm
def test_service_monitors_replace_pod_monitors_when_chosen():
    docs = with_api("monitoring.serviceMonitor.enabled=true")
    assert "PodMonitor" not in kinds(docs)
    service = one(docs, "Service", "edgeloop-operator-metrics")
    operator_pod = one(docs, "Deployment", "edgeloop-operator")["spec"]["template"]
    assert service["spec"]["selector"].items() <= operator_pod["metadata"]["labels"].items()
    monitor = one(docs, "ServiceMonitor", "edgeloop-operator")
    assert monitor["spec"]["endpoints"][0]["honorLabels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    runtime = one(docs, "ServiceMonitor", "edgeloop-runtime")["spec"]
    from edgeloop.render.inferencemodel import owner_of, render
    from test_chart import EXAMPLE, InferenceModelSpec

    model_service = render(
        owner_of("digits", "edge-a", "uid"), InferenceModelSpec.model_validate(EXAMPLE["spec"]), config.build()
    ).service
    assert runtime["selector"]["matchLabels"].items() <= model_service["metadata"]["labels"].items()
    assert runtime["endpoints"][0]["port"] in {p["name"] for p in model_service["spec"]["ports"]}
    both = helm(
        "template",
        "edgeloop",
        str(CHART),
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        "--set",
        "monitoring.podMonitor.enabled=true",
        check=False,
    )
    assert both.returncode != 0 and "choose one" in both.stderr


@needs_helm
def test_the_operator_network_policy_can_admit_prometheus_only():
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    docs = template("monitoring.scrapeFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring")
    [rule] = one(docs, "NetworkPolicy", "edgeloop-operator")["spec"]["ingress"]
    assert rule == {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": [peer]}


def dashboard() -> dict:
    return json.loads((CHART / "files" / "dashboard.json").read_text())


OPERATOR_METRICS = {f.name for f in metrics.fleet([], [], config.build())} | {
    "edgeloop_operator_active",
    "edgeloop_operator_reconciles",
    "edgeloop_operator_reconcile_duration_seconds",
}
NAME = re.compile(r"\b((?:edgeloop|nv)_[a-z0-9_]+)")


def family(name: str) -> str:
    """A metric family's name from a sample's (nv_inference_count is a family of its own)."""
    known = OPERATOR_METRICS | set(metrics.RUNTIME_METRICS) | set(metrics.AGGREGATOR_METRICS)
    return name if name in known else re.sub(r"_(total|bucket|count|sum)$", "", name)


def test_the_aggregators_metrics_the_dashboard_reads_are_the_ones_it_exports():
    source = (CHART.parents[1] / "runtime-image" / "edgeloop_runtime" / "federated" / "metrics.py").read_text()
    assert [name for name in metrics.AGGREGATOR_METRICS if f'"{name}' not in source] == []


def test_every_dashboard_query_reads_metrics_that_exist():
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    used = {family(n) for expr in exprs for n in NAME.findall(expr)}
    known = OPERATOR_METRICS | set(metrics.RUNTIME_METRICS) | set(metrics.AGGREGATOR_METRICS)
    assert used <= known, used - known
    assert used >= set(metrics.RUNTIME_METRICS) - {"nv_inference_request_failure"} | {
        "edgeloop_inferencemodel_nodes",
        "edgeloop_federatedround_accuracy",
        "edgeloop_operator_reconciles",
    }


@needs_helm
def test_the_dashboard_config_map_is_the_file_for_grafanas_sidecar():
    [config_map] = [d for d in by_kind(template(), "ConfigMap") if d["metadata"]["name"] == "edgeloop-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["edgeloop-fleet.json"]) == dashboard()
    assert not [
        d
        for d in by_kind(template("monitoring.dashboard.enabled=false"), "ConfigMap")
        if d["metadata"]["name"] == "edgeloop-dashboard"
    ]


def test_every_panel_says_what_it_shows():
    board = dashboard()
    titles = [p["title"] for p in board["panels"] if p["type"] != "row"]
    assert len(titles) == len(set(titles))
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["legendFormat"], f"{panel['title']}: a legend names the series"
            assert "$namespace" in target["expr"] or "edgeloop_operator" in target["expr"], panel["title"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query (with Grafana's variables filled in) as a recording rule's expression."""
    substitutions = {"$namespace": "edge", "$model": "digits", "$__rate_interval": "1m"}
    rules = []
    for number, target in enumerate(t for p in dashboard()["panels"] for t in p.get("targets", [])):
        expr = target["expr"]
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr.replace('"$1"', ""), expr
        rules.append({"record": f"edgeloop:dashboard_{number}", "expr": expr})
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / "dashboard.yaml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
def test_the_aggregator_pod_monitor_reads_its_plain_metrics_port():
    from test_chart import federated_pods

    monitor = one(with_api(), "PodMonitor", "edgeloop-aggregator")["spec"]
    pods = federated_pods(config.build())
    aggregator = pods["aggregator"]
    assert monitor["selector"]["matchLabels"].items() <= aggregator["metadata"]["labels"].items()
    assert not monitor["selector"]["matchLabels"].items() <= pods["client"]["metadata"]["labels"].items()
    [endpoint] = monitor["podMetricsEndpoints"]
    [port] = [p for p in aggregator["spec"]["containers"][0]["ports"] if p["name"] == endpoint["port"]]
    assert "scheme" not in endpoint, "plain HTTP: Prometheus has no client certificate for the mTLS port"
    annotations = aggregator["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == (
        "true",
        str(port["containerPort"]),
    )
    args = aggregator["spec"]["containers"][0]["args"]
    assert args[args.index("--metrics-port") + 1] == str(port["containerPort"])
