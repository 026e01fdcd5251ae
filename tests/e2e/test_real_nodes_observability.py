"""Observability on real nodes: a model served on the session's real nodes (real_release) and a federated round
trained on them, observed by a real Prometheus (Debian's) that scrapes the operator, the runtimes and the round's
aggregator, evaluates the chart's alerting rules, and answers every PromQL expression of the chart's dashboard and
rules after real inference traffic; `kubectl edgeloop` shows each node as a user with read-only rights sees it;
the chart's monitor objects pass the Prometheus Operator's CRDs (server-side dry run).

The module serves and trains what it observes itself (model `observed`, round `observed-1`) and deletes them
when done: each real node has one GPU or NPU. What the runtimes do not export (CONTRACTS.md C7) would be named
in a skip, never asserted as absent."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from edgeloop import metrics

from .conftest import DevCluster, RealRelease, wait_for
from .test_real_nodes import GROUP_LABEL, digits_inputs, write_digits

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "edgeloop"
NS, MODEL, ROUND = RealRelease.workload_namespace, "observed", "observed-1"
RUNTIME_SOURCE = "\n".join(p.read_text() for p in (ROOT / "runtime-image" / "edgeloop_runtime").glob("*.py"))
DAEMON_SET_TEMPLATE = (ROOT / "operator" / "edgeloop" / "templates" / "daemonset.yaml.j2").read_text()
# The runtime's info metric is labelled with its accelerator class once the runtime takes it and the operator
# renders it (C3); its node label comes from the scrape as well.
PENDING_LABELS = set() if "--accelerator" in DAEMON_SET_TEMPLATE and '"accelerator"' in RUNTIME_SOURCE \
    else {"accelerator"}
PENDING_METRICS = {name for name in metrics.RUNTIME_METRICS if name not in RUNTIME_SOURCE}
SUBSTITUTIONS = {"$namespace": NS, "$model": MODEL, "$__rate_interval": "1m"}


@dataclass(frozen=True)
class Observed:
    release: RealRelease
    nodes: list[str]  # every real node
    gpu_nodes: list[str]  # GPU-labelled, without a GPU: the gpu variant falls back to the CPU there
    sha256: str

    @property
    def devcluster(self):
        return self.release.devcluster

    def debug(self) -> str:
        return self.release.debug(NS)


@pytest.fixture(scope="module")
def observed(real_release: RealRelease) -> Observed:
    """Model `observed` (version 1, the example's placement) served on every real node, and their data for a
    round; both deleted afterwards."""
    from edgeloop_runtime.federated.model import mlp

    devcluster, real = real_release.devcluster, list(real_release.devcluster.nodes)
    real_release.delete_models("digits")  # test_real_nodes.py's story holds each node's one GPU or NPU
    groups = {n["metadata"]["name"]: n["metadata"]["labels"][GROUP_LABEL]
              for n in devcluster.get_json("nodes")["items"]}
    # The gpu class may run on the CPU on these nodes (a chart value; unchanged if test_real_nodes.py set it).
    real_release.helm("upgrade", real_release.name, str(CHART), "--namespace", real_release.namespace,
                      "--reuse-values", "--set", "config.acceleratorClasses.gpu.allowCpuFallback=true",
                      "--wait", "--timeout", "300s")
    digest = real_release.upload(mlp([64, 32, 10], seed=0))
    model = yaml.safe_load((ROOT / "examples" / "inferencemodel-digits.yaml").read_text())
    model["metadata"] = {"name": MODEL, "namespace": NS}
    model["spec"]["model"] = {"uri": real_release.model_uri(digest), "sha256": digest, "version": "1"}
    devcluster.kubectl("apply", "-f", "-", input=json.dumps(model))
    write_digits(real, NS)
    watched = Observed(real_release, sorted(n.name for n in real),
                       sorted(n.name for n in real if groups[n.name] == "edge-real"), digest)

    def served():  # Ready, with what each variant runs on asked of its runtime
        body = devcluster.get_json("inferencemodel", MODEL, "-n", NS)
        status = body.get("status", {})
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
        return ready and all(v["providersInUse"] for v in status["variants"] if v["desired"])

    try:
        wait_for(f"InferenceModel {MODEL} to serve on every real node", served, timeout=300, debug=watched.debug)
        yield watched
    finally:
        devcluster.kubectl("delete", "federatedround", ROUND, "-n", NS, "--ignore-not-found", "--wait=false")
        devcluster.kubectl("delete", "inferencemodel", MODEL, "-n", NS, "--ignore-not-found", "--wait=true")
        wait_for("the model's pods to be gone", lambda: not devcluster.get_json(
            "pods", "-n", NS, "-l", f"edgeloop.io/inferencemodel={MODEL}")["items"], debug=watched.debug)


def start_round(observed: Observed) -> None:
    """Six short training rounds on every real node, not promoted (the model stays as it is observed)."""
    round_ = yaml.safe_load((ROOT / "examples" / "federatedround-digits.yaml").read_text())
    round_["metadata"] = {"name": ROUND, "namespace": NS}
    spec = round_["spec"]
    spec["modelRef"] = {"name": MODEL}
    spec["participants"] = {"nodeSelector": {"kubernetes.io/os": "linux"},
                            "minClients": len(observed.nodes), "maxClients": len(observed.nodes)}
    spec["training"]["rounds"] = 6
    spec["promote"] = {"enabled": False}
    spec["runtime"]["resources"]["requests"] = {"cpu": "100m", "memory": "128Mi"}
    observed.devcluster.kubectl("apply", "-f", "-", input=json.dumps(round_))


def finished_round(observed: Observed) -> dict:
    """ROUND, Succeeded (started here if no test before did)."""
    devcluster = observed.devcluster
    if devcluster.kubectl("get", "federatedround", ROUND, "-n", NS, check=False).returncode != 0:
        start_round(observed)

    def succeeded():
        body = devcluster.get_json("federatedround", ROUND, "-n", NS)
        return body.get("status", {}).get("phase") == "Succeeded" and body

    return wait_for(f"{ROUND} to succeed", succeeded, timeout=300, debug=observed.debug)


def helm_template(devcluster: DevCluster, *sets: str, namespace: str = RealRelease.namespace) -> list[dict]:
    args = ["helm", "template", RealRelease.name, str(CHART), "--namespace", namespace]
    for value in sets:
        args += ["--set", value]
    result = subprocess.run(args, env=devcluster.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def scrape_job(prometheus, monitor: dict) -> dict:
    """The chart's runtime PodMonitor as the Prometheus Operator turns it into a scrape job."""
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    keep = [{"source_labels": [f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', key)}"], "regex": value,
             "action": "keep"} for key, value in monitor["spec"]["selector"]["matchLabels"].items()]
    keep.append({"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": endpoint["port"],
                 "action": "keep"})
    tls = {"insecure_skip_verify": endpoint.get("tlsConfig", {}).get("insecureSkipVerify", False)}
    return prometheus.pod_job("edgeloop-runtime", keep, metrics_path=endpoint["path"],
                              scheme=endpoint.get("scheme", "http"), tls_config=tls)


def traffic(observed: Observed, seconds: float, stop: threading.Event | None = None) -> int:
    """Requests to every node's runtime at its pod IP (gRPC over TLS, the model Service's certificate), a few
    of them malformed; returns how many were answered."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    release = observed.release
    ca = release.devcluster.nodes[0].dir / f"{MODEL}-ca.crt"
    ca.write_bytes(release.secret(NS, f"{MODEL}-tls", "ca.crt"))
    pods = observed.devcluster.get_json("pods", "-n", NS, "-l", f"edgeloop.io/inferencemodel={MODEL}")["items"]
    inputs = digits_inputs()
    answered, malformed, refused = [0], [0], [0]

    def drive(pod_ip: str) -> None:
        client = grpcclient.InferenceServerClient(
            f"{pod_ip}:8001", ssl=True, root_certificates=str(ca),
            channel_args=[("grpc.ssl_target_name_override", f"{MODEL}.{NS}.svc")])
        name = client.get_model_metadata(MODEL, as_json=True)["inputs"][0]["name"]
        deadline, sent = time.monotonic() + seconds, 0
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            batch = inputs[: 1 + sent % 4]
            request = grpcclient.InferInput(name, list(batch.shape), "FP32")
            request.set_data_from_numpy(batch)
            client.infer(MODEL, [request])
            answered[0] += 1
            sent += 1
            if sent % 50 == 0:  # the wrong shape: a failed request (2 %, under the alert's 5 %)
                wrong = grpcclient.InferInput(name, [1, 3], "FP32")
                wrong.set_data_from_numpy(np.zeros((1, 3), np.float32))
                malformed[0] += 1
                try:
                    client.infer(MODEL, [wrong])
                except InferenceServerException:
                    refused[0] += 1
            time.sleep(0.005)  # a steady load, not a benchmark: the machine is shared
        client.close()

    threads = [threading.Thread(target=drive, args=(pod["status"]["podIP"],)) for pod in pods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refused[0] == malformed[0], "every malformed request is refused"
    return answered[0]


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def summary_labels(rule: dict) -> set[str]:
    return set(re.findall(r"\$labels\.(\w+)", rule["annotations"]["summary"]))


def used_metrics(expr: str) -> set[str]:
    """The metric families an expression reads (nv_inference_count is a family, not a histogram's count)."""
    names = re.findall(r"\b((?:edgeloop|nv)_[a-z0-9_]+)", expr)
    return {n if n in metrics.RUNTIME_METRICS else re.sub(r"_(bucket|total)$", "", n) for n in names}


def dashboard_targets(aggregators: bool) -> list[tuple[str, str, set[str]]]:
    """(panel title, expression, labels its legend shows) of the dashboard's queries: those of the running
    aggregators' row, or all the others."""
    board = json.loads((CHART / "files" / "dashboard.json").read_text())
    return [(panel["title"], target["expr"], legend_labels(target["legendFormat"]))
            for panel in board["panels"] for target in panel.get("targets", [])
            if bool(used_metrics(target["expr"]) & set(metrics.AGGREGATOR_METRICS)) == aggregators]


class Evaluator:
    """Evaluates expressions through Prometheus's HTTP API with the dashboard's variables filled in, checking
    that the series carry the labels shown, with the values this cluster has; notes those that wait for the
    runtime's C7 names instead."""

    def __init__(self, prometheus, expected_values: dict[str, set[str]]):
        self.prometheus, self.expected_values, self.pending = prometheus, expected_values, []

    def __call__(self, what: str, expr: str, labels: set[str], must_return: bool = True) -> list[dict]:
        for variable, value in SUBSTITUTIONS.items():
            expr = expr.replace(variable, value)
        if missing := used_metrics(expr) & PENDING_METRICS:
            self.pending.append(f"{what} ({', '.join(sorted(missing))})")
            return []
        result = self.prometheus.query(expr)  # a PromQL error raises, with Prometheus's message
        if must_return:
            assert result, f"{what}: no series for {expr}"
        for series in result:
            labelled = series["metric"]
            for label in labels - PENDING_LABELS:
                assert labelled.get(label), f"{what}: a series without {label}: {labelled} ({expr})"
                if label in self.expected_values:
                    assert labelled[label] in self.expected_values[label], f"{what}: {labelled} ({expr})"
        return result

    def skip_pending(self) -> None:
        if self.pending:
            waiting = "; ".join(self.pending)
            pytest.skip(f"the runtime does not export these yet (CONTRACTS.md C7, serve room): {waiting}")


def test_a_real_prometheus_answers_every_dashboard_and_alert_expression(observed, prometheus, promtool):
    devcluster, nodes = observed.devcluster, observed.nodes
    rendered = helm_template(devcluster, "monitoring.podMonitor.enabled=true", "monitoring.prometheusRule.enabled=true")
    [rule] = [doc for doc in rendered if doc["kind"] == "PrometheusRule"]
    [monitor] = [doc for doc in rendered if doc["kind"] == "PodMonitor" and doc["metadata"]["name"].endswith("runtime")]
    rules_file = prometheus.directory / "edgeloop-rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    checked = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert checked.returncode == 0 and "SUCCESS: 6 rules found" in checked.stdout, checked.stdout + checked.stderr
    prometheus.reconfigure([scrape_job(prometheus, monitor)], [rules_file])

    # The operator (found by its annotations) and every node's runtime (by the chart's PodMonitor) are up.
    def scraped():
        up = prometheus.query('up{job="edgeloop-runtime"} == 1 or up{job="kubernetes-pods"} == 1')
        runtimes = sorted(s["metric"]["node"] for s in up if s["metric"]["job"] == "edgeloop-runtime")
        operator = [s for s in up if s["metric"]["pod"].startswith(f"{RealRelease.name}-operator")]
        return runtimes == nodes and operator

    wait_for("Prometheus to scrape the operator and every runtime", scraped, timeout=120,
             debug=lambda: json.dumps(prometheus.targets(), indent=1)[-4000:])

    # A round runs while the runtimes serve: its aggregator's plain metrics port is scraped by its annotations,
    # and the dashboard's row of running rounds answers for it.
    start_round(observed)
    assert traffic(observed, seconds=12) > 20
    aggregator = f"{ROUND}-aggregator-"
    running = Evaluator(prometheus, {"namespace": {NS}})
    targets = dashboard_targets(aggregators=True)

    def answered():
        results = [prometheus.query(expr.replace("$namespace", NS).replace("$__rate_interval", "1m"))
                   for _, expr, _ in targets]
        return all(any(s["metric"]["pod"].startswith(aggregator) for s in result) for result in results)

    wait_for(f"every panel of running rounds to answer while {ROUND} runs", answered, timeout=300,
             debug=observed.debug)
    for title, expr, labels in targets:
        assert any(s["metric"]["pod"].startswith(aggregator) for s in running(f"panel {title!r}", expr, labels)), title

    fr = finished_round(observed)
    wait_for(f"{ROUND}'s success in the operator's metrics", lambda: prometheus.query(
        f'edgeloop_federatedround_phase{{namespace="{NS}", federatedround="{ROUND}", phase="Succeeded"}} == 1'))

    status = devcluster.get_json("inferencemodel", MODEL, "-n", NS)["status"]
    check = Evaluator(prometheus, {
        "node": set(nodes), "namespace": {NS}, "model": {MODEL}, "inferencemodel": {MODEL},
        "version": {status["model"]["version"]}, "sha256": {status["model"]["sha256"]}, "federatedround": {ROUND},
    })
    for title, expr, labels in dashboard_targets(aggregators=False):
        result = check(f"panel {title!r}", expr, labels)
        if "node" in labels and result:
            assert sorted({s["metric"]["node"] for s in result}) == nodes, f"every node in {title!r}"
    # (test_real_nodes.py's round, when it ran, has its series too)
    trained = f'edgeloop_federatedround_accuracy{{namespace="{NS}", federatedround="{ROUND}"}}'
    accuracy = check("trained accuracy", trained, {"federatedround"})
    assert float(accuracy[0]["value"][1]) == pytest.approx(fr["status"]["metrics"]["accuracy"])
    failed = check("failed requests", f'sum by (reason) (nv_inference_request_failure{{namespace="{NS}"}}) > 0',
                   {"reason"}, must_return=not PENDING_METRICS)
    assert [s["metric"]["reason"] for s in failed] == (["OTHER"] if failed else []), "the wrong shape is OTHER"

    # Prometheus evaluates the rules itself: each without an error; the CPU fallback of the gpu class (the
    # GPU-labelled nodes have no GPU) is pending or firing, and nothing else is.
    def evaluated():
        groups = [g for g in prometheus.rules() if g["name"] == "edgeloop"]
        return groups and all(r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown"
                              for r in groups[0]["rules"]) and groups[0]

    group = wait_for("the rules to be evaluated", evaluated, timeout=60)
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in group["rules"] if r["health"] != "ok"] == []
    states = {r["name"]: r["state"] for r in group["rules"]}
    fallback = states.pop("EdgeloopCPUFallback")
    assert fallback in (("pending", "firing") if observed.gpu_nodes else ("inactive",)), states
    assert set(states.values()) == {"inactive"}, states
    for alert in rule["spec"]["groups"][0]["rules"]:
        name = alert["alert"]
        fires = name == "EdgeloopCPUFallback" and bool(observed.gpu_nodes)
        firing = check(f"alert {name}", alert["expr"], summary_labels(alert), must_return=fires)
        if fires:
            assert [s["metric"]["accelerator"] for s in firing] == ["gpu"]
        else:
            assert not firing, f"{name} fires: {firing}"
        for used in used_metrics(alert["expr"]) - PENDING_METRICS:  # each input of the alert has series
            assert prometheus.query(f'count({{__name__=~"{used}(_bucket|_total)?"}})'), f"{name}: no {used} series"
    if output := os.environ.get("EDGELOOP_PLOT_DASHBOARD"):  # docs/observability.md's picture of this run
        subprocess.run([sys.executable, str(ROOT / "hack" / "plot_dashboard.py"), "--prometheus", prometheus.url,
                        "--output", output, "--set", f"namespace={NS}", "--set", f"model={MODEL}"], check=True)
    check.skip_pending()


def viewer_kubeconfig(observed: Observed, tmp_path: Path, name: str, pods_proxy: bool) -> Path:
    """A ServiceAccount that may read pods and edgeloop's custom resources in the models namespace (and, with
    `pods_proxy`, ask pods through the API server): a user of kubectl edgeloop, not an administrator."""
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
             {"apiGroups": ["edgeloop.io"], "resources": ["inferencemodels", "federatedrounds"],
              "verbs": ["get", "list"]}]
    if pods_proxy:
        rules.append({"apiGroups": [""], "resources": ["pods/proxy"], "verbs": ["get"]})
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NS}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name, "namespace": NS},
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": NS},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NS}]},
    ]
    devcluster = observed.devcluster
    devcluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
    token = devcluster.kubectl("create", "token", name, "-n", NS, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(devcluster.kubeconfig.read_text())
    cluster = admin["clusters"][0]
    path = tmp_path / f"{name}.kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": cluster["name"], "user": name, "namespace": NS}}],
        "current-context": name,
    }))
    return path


def kubectl_edgeloop(observed: Observed, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl edgeloop …`: kubectl finds the plugin on PATH (the virtualenv's console script)."""
    env = {**observed.devcluster.env, "KUBECONFIG": str(kubeconfig),
           "PATH": f"{Path(sys.executable).parent}:{observed.devcluster.env['PATH']}"}
    result = subprocess.run(["kubectl", "edgeloop", *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_kubectl_edgeloop_shows_each_real_node_as_a_reader_sees_it(observed, tmp_path):
    devcluster = observed.devcluster
    spec_model = devcluster.get_json("inferencemodel", MODEL, "-n", NS)["spec"]["model"]
    reader = viewer_kubeconfig(observed, tmp_path, "fleet-reader", pods_proxy=True)
    stop = threading.Event()
    load = threading.Thread(target=traffic, args=(observed, 60, stop))
    load.start()
    try:
        time.sleep(2)
        listed = json.loads(kubectl_edgeloop(observed, reader, "nodes", MODEL, "-o", "json", "--window", "3").stdout)
        table = kubectl_edgeloop(observed, reader, "nodes", MODEL).stdout.splitlines()
    finally:
        stop.set()
        load.join()
    rows = {r["node"]: r for r in listed["items"]}
    assert sorted(rows) == observed.nodes
    for node, row in rows.items():
        assert (row["version"], row["sha256"]) == (spec_model["version"], spec_model["sha256"]), row
        assert row["variant"] == ("gpu" if node in observed.gpu_nodes else "npu"), row
        # What each runtime says it runs on: the CPU in the GPU's stead; OpenVINO (on the CPU device) for the NPU.
        assert row["providers"] == (["CPUExecutionProvider"] if node in observed.gpu_nodes
                                    else ["OpenVINOExecutionProvider", "CPUExecutionProvider"]), row
        assert row["status"] == "Running" and row["requestsPerSecond"] > 0 and 0 < row["p99Seconds"] < 5, row
    assert table[0].split() == ["NODE", "MODEL", "VARIANT", "VERSION", "DIGEST", "PROVIDERS", "STATUS", "RESTARTS",
                                "REQ/S", "P99"]
    assert len(table) == 1 + len(rows) and all(spec_model["sha256"][:12] in line for line in table[1:])
    print("\n".join(["$ kubectl edgeloop nodes " + MODEL, *table]))  # what docs/observability.md shows (pytest -s)

    # Without pods/proxy the rows stay; what only the runtimes know is left out, and the user is told why.
    blind = viewer_kubeconfig(observed, tmp_path, "fleet-blind", pods_proxy=False)
    result = kubectl_edgeloop(observed, blind, "nodes", MODEL, "-o", "json", "--window", "0")
    assert [r["providers"] for r in json.loads(result.stdout)["items"]] == [[]] * len(rows)
    assert "pods/proxy" in result.stderr

    round_ = finished_round(observed)
    shown = f"{round_['status']['metrics']['accuracy']:#.3g}"
    rounds = kubectl_edgeloop(observed, reader, "rounds").stdout.splitlines()
    print("\n".join(["$ kubectl edgeloop rounds", *rounds]))
    row = next(line.split() for line in rounds if line.startswith(ROUND + " "))
    clients = f"{len(observed.nodes)}/{len(observed.nodes)}"
    assert row[1:5] == [MODEL, "Succeeded", round_["status"]["progress"], clients], rounds
    assert row[6] == shown == round_["status"]["accuracy"]
    # kubectl get fr prints the same: 3 significant digits, not 0.9722222222222222.
    table = devcluster.kubectl("get", "fr", ROUND, "-n", NS).stdout.splitlines()
    assert table[0].split()[4] == "ACCURACY" and table[1].split()[4] == shown


def test_the_charts_monitor_objects_pass_the_prometheus_operators_crds(devcluster, prometheus_operator_crds,
                                                                       namespace):
    for values, expected in (
        (["monitoring.podMonitor.enabled=true", "monitoring.prometheusRule.enabled=true"],
         {"PodMonitor", "PrometheusRule"}),
        (["monitoring.serviceMonitor.enabled=true", "tls.mode=disabled"], {"ServiceMonitor", "Service"}),
    ):
        monitoring = [doc for doc in helm_template(devcluster, *values, namespace=namespace)
                      if doc["apiVersion"].startswith("monitoring.coreos.com/") or doc["kind"] == "Service"]
        assert {doc["kind"] for doc in monitoring} >= expected
        result = devcluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", "-",
                                    input=yaml.safe_dump_all(monitoring), check=False)
        assert result.returncode == 0, result.stderr
    # With the API served, the defaults (auto) render them too: helm asks the cluster for its API versions.
    auto = subprocess.run(["helm", "template", "x", str(CHART), "-n", namespace, "--validate",
                           "--set", "operator.replicas=1"], env=devcluster.env, capture_output=True, text=True,
                          timeout=120)
    kinds = {doc["kind"] for doc in yaml.safe_load_all(auto.stdout) if doc}
    assert auto.returncode == 0 and {"PodMonitor", "PrometheusRule"} <= kinds, auto.stderr
