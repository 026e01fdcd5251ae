"""A real Prometheus for a devcluster with real nodes, and the Prometheus Operator's CRDs.

Prometheus is Debian's package (`make real-nodes` installs it), run as a host process of the cluster (recorded
with its processes, so `down` stops it; its data lives in the run directory). It scrapes pods at their pod IPs,
which the host routes to their nodes. Debian builds Prometheus without kubernetes_sd (client-go is not packaged
in Debian), so pods are found by file_sd instead: a discovery thread of the process that started Prometheus
lists the pods every SCRAPE_INTERVAL and writes them as kubernetes_sd's role `pod` would describe them (one
target per declared container port, or the pod IP; the same `__meta_kubernetes_pod_*` labels), so relabelings
written for kubernetes_sd work unchanged. The default job scrapes the pods that ask for it with the
`prometheus.io/scrape: "true"` annotation convention (`prometheus.io/port`, `/path`, `/scheme`); tests add
jobs of their own (`Prometheus.pod_job`, e.g. with a CA for HTTPS) and rule files with `reconfigure`.

The Prometheus Operator's CRDs (PodMonitor, ServiceMonitor, PrometheusRule) come from the prometheus-operator Go
module's zip (example/prometheus-operator-crd/), downloaded and checksum-verified by `go mod download`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from devcluster import cluster
from devcluster.errors import ClusterError

OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
OPERATOR_CRDS = ("podmonitors", "servicemonitors", "prometheusrules")  # what charts render; not the big ones
SCRAPE_INTERVAL_SECONDS = 2  # tests wait for series: discover, scrape and evaluate often
SCRAPE_INTERVAL = f"{SCRAPE_INTERVAL_SECONDS}s"


def unavailable_reason() -> str | None:
    missing = [name for name in ("prometheus", "promtool") if shutil.which(name) is None]
    return f"{' and '.join(missing)} not installed (Debian: apt-get install prometheus; `make real-nodes`)" \
        if missing else None


def operator_crds() -> list[Path]:
    """The CRD files of the pinned prometheus-operator module (downloaded once into the Go module cache)."""
    result = subprocess.run(["go", "mod", "download", "-json", OPERATOR_MODULE], cwd=tempfile.gettempdir(),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"go mod download {OPERATOR_MODULE}: {result.stdout}{result.stderr}")
    crds = Path(json.loads(result.stdout)["Dir"]) / "example" / "prometheus-operator-crd"
    return [crds / f"monitoring.coreos.com_{plural}.yaml" for plural in OPERATOR_CRDS]


def _label_name(name: str) -> str:
    """As Prometheus sanitizes Kubernetes label and annotation names into label names."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(pods: list[dict]) -> list[dict]:
    """file_sd target groups for `pods` (a pod list's items), labelled as kubernetes_sd's role `pod` labels
    them: one target per declared container port (address pod IP:port), or one at the pod IP without."""
    groups = []
    for pod in pods:
        meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
        if not status.get("podIP"):
            continue
        ready = next((c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"), "unknown")
        labels = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_uid": meta.get("uid", ""),
            "__meta_kubernetes_pod_ip": status["podIP"],
            "__meta_kubernetes_pod_host_ip": status.get("hostIP", ""),
            "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
            "__meta_kubernetes_pod_ready": ready.lower(),
        }
        for kind, values in (("label", meta.get("labels", {})), ("annotation", meta.get("annotations", {}))):
            for key, value in values.items():
                labels[f"__meta_kubernetes_pod_{kind}_{_label_name(key)}"] = value
                labels[f"__meta_kubernetes_pod_{kind}present_{_label_name(key)}"] = "true"
        ports = [(container, port) for container in spec["containers"] for port in container.get("ports", [])]
        for container, port in ports or [(spec["containers"][0], None)]:
            target = {**labels, "__meta_kubernetes_pod_container_name": container["name"]}
            address = status["podIP"]
            if port:
                address = f"{address}:{port['containerPort']}"
                target |= {"__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                           "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                           "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP")}
            groups.append({"targets": [address], "labels": target})
    return groups


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus of a devcluster: its HTTP API at `url`."""

    url: str
    run_dir: Path  # the cluster's

    @property
    def directory(self) -> Path:
        return self.run_dir / "prometheus"

    @property
    def config_file(self) -> Path:
        return self.directory / "prometheus.yml"

    @property
    def pods_file(self) -> Path:
        """The cluster's pods as file_sd targets, kept current by the discovery thread."""
        return self.directory / "pods.json"

    def pod_job(self, name: str, relabel_configs: list[dict] = (), **options) -> dict:
        """A scrape job over the cluster's running pods (as kubernetes_sd's role pod would find them),
        labelling each series with its namespace, pod and node, then `relabel_configs`; `options` are the job's
        other settings (scheme, tls_config, metrics_path, ...)."""
        return {
            "job_name": name,
            "file_sd_configs": [{"files": [str(self.pods_file)], "refresh_interval": SCRAPE_INTERVAL}],
            "relabel_configs": [
                {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node"},
                *relabel_configs,
            ],
            **options,
        }

    def annotated_pods_job(self) -> dict:
        """The default job: pods annotated `prometheus.io/scrape: "true"`, at their `prometheus.io/port`,
        `prometheus.io/path` and `prometheus.io/scheme` (default: their ports, /metrics, http)."""
        annotation = "__meta_kubernetes_pod_annotation_prometheus_io_"
        return self.pod_job("kubernetes-pods", [
            {"source_labels": [f"{annotation}scrape"], "regex": "true", "action": "keep"},
            {"source_labels": [f"{annotation}scheme"], "regex": "(https?)", "target_label": "__scheme__"},
            {"source_labels": [f"{annotation}path"], "regex": "(.+)", "target_label": "__metrics_path__"},
            {"source_labels": ["__address__", f"{annotation}port"], "regex": r"([^:]+)(?::\d+)?;(\d+)",
             "replacement": "$1:$2", "target_label": "__address__"},
        ], honor_labels=True)  # as prometheus-community's kubernetes-pods job: an exporter's namespace label wins

    def reconfigure(self, scrape_configs: list[dict] = (), rule_files: list[Path] = ()) -> None:
        """Scrape the annotated pods and `scrape_configs`, evaluate `rule_files`; applied at once."""
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [self.annotated_pods_job(), *scrape_configs],
        }
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        if self._running():
            self._call("POST", "/-/reload")

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector (or matrix); a PromQL error raises ClusterError with its message."""
        body = self._call("GET", "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        return json.loads(body)["data"]["result"]

    def rules(self) -> list[dict]:
        """The rule groups loaded, with their rules' state."""
        return json.loads(self._call("GET", "/api/v1/rules"))["data"]["groups"]

    def targets(self) -> list[dict]:
        return json.loads(self._call("GET", "/api/v1/targets"))["data"]["activeTargets"]

    def _running(self) -> bool:
        try:
            return self._call("GET", "/-/ready", timeout=2) is not None
        except (OSError, ClusterError):
            return False

    def _call(self, method: str, path: str, timeout: float = 30) -> str:
        request = urllib.request.Request(self.url + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read().decode()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            with_message = json.loads(detail).get("error", detail) if detail.startswith("{") else detail
            raise ClusterError(f"Prometheus {method} {path}: HTTP {error.code}: {with_message}") from None


def discover_pods(target: cluster.Cluster, prometheus: Prometheus, stop: threading.Event) -> None:
    """Until `stop`: write the cluster's pods as file_sd targets whenever they change (a replace, so
    Prometheus never reads half a file)."""
    api, written = cluster.connect(target), None
    try:
        while not stop.is_set():
            with contextlib.suppress(OSError, http.client.HTTPException):
                code, body = api.request("GET", "/api/v1/pods")
                if code == 200 and (groups := pod_targets(body["items"])) != written:
                    partial = prometheus.pods_file.with_suffix(".partial")
                    partial.write_text(json.dumps(groups))
                    partial.replace(prometheus.pods_file)
                    written = groups
            stop.wait(SCRAPE_INTERVAL_SECONDS)
    finally:
        api.close()


def start(target: cluster.Cluster, timeout: float = 60) -> tuple[Prometheus, threading.Event]:
    """Start Prometheus for a running cluster with real nodes, and its pod discovery in a thread of this
    process; set the returned event to stop the discovery (`down` stops Prometheus)."""
    if reason := unavailable_reason():
        raise ClusterError(reason)
    state = target.state()
    if not state or state.get("network") is None:
        raise ClusterError("Prometheus scrapes real nodes' pods: start the cluster with real nodes")
    run_dir, port = target.run_dir, cluster.free_port()
    prometheus = Prometheus(f"http://127.0.0.1:{port}", run_dir)
    (prometheus.directory / "data").mkdir(parents=True, exist_ok=True)
    prometheus.pods_file.write_text("[]")
    prometheus.reconfigure()
    stop = threading.Event()
    threading.Thread(target=discover_pods, args=(target, prometheus, stop), name="prometheus-pods",
                     daemon=True).start()
    argv = [shutil.which("prometheus"), f"--config.file={prometheus.config_file}",
            f"--storage.tsdb.path={prometheus.directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle", "--storage.tsdb.retention.time=2h", "--log.level=warn"]
    state["ports"]["prometheus"] = port
    state["processes"].append(cluster.start_process("prometheus", argv, run_dir / "logs"))
    target.state_file.write_text(json.dumps(state, indent=2))
    try:
        cluster.wait_for("Prometheus /-/ready", prometheus._running, timeout, run_dir / "logs" / "prometheus.log")
    except ClusterError:
        stop.set()
        raise
    return prometheus, stop


def wait_for_series(prometheus: Prometheus, expr: str, timeout: float = 60) -> list[dict]:
    """The first non-empty result of `expr` (Prometheus scrapes every SCRAPE_INTERVAL)."""
    deadline = time.monotonic() + timeout
    while True:
        if result := prometheus.query(expr):
            return result
        if time.monotonic() > deadline:
            raise ClusterError(f"no series for {expr!r} after {timeout:.0f} s; targets: {prometheus.targets()}")
        time.sleep(1)
