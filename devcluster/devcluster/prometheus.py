"""A real Prometheus for a devcluster with real nodes, and the Prometheus Operator's CRDs.

Prometheus is Debian's package (`make real-nodes` installs it), run as a host process of the cluster (recorded
with its processes, so `down` stops it; its data lives in the run directory). It finds pods through the
apiserver (kubernetes_sd, as user `system:prometheus`, manifests/prometheus-rbac.yaml) and scrapes them at their
pod IPs, which the host routes to their nodes. Its default job scrapes the pods that ask for it with the
`prometheus.io/scrape: "true"` annotation convention (`prometheus.io/port`, `/path`, `/scheme`); tests add
jobs of their own (`Prometheus.pod_job`, e.g. with a CA for HTTPS) and rule files with `reconfigure`.

The Prometheus Operator's CRDs (PodMonitor, ServiceMonitor, PrometheusRule) come from the prometheus-operator Go
module's zip (example/prometheus-operator-crd/), downloaded and checksum-verified by `go mod download`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from devcluster import cluster, nodes, pki
from devcluster.errors import ClusterError

OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
OPERATOR_CRDS = ("podmonitors", "servicemonitors", "prometheusrules")  # what charts render; not the big ones
SCRAPE_INTERVAL = "2s"  # tests wait for series: scrape and evaluate often


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


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus of a devcluster: its HTTP API at `url`."""

    url: str
    run_dir: Path  # the cluster's
    server: str  # the apiserver's URL, for kubernetes_sd

    @property
    def config_file(self) -> Path:
        return self.run_dir / "prometheus" / "prometheus.yml"

    def pod_job(self, name: str, relabel_configs: list[dict] = (), **options) -> dict:
        """A scrape job over the cluster's pods (kubernetes_sd, role pod), labelling each series with its
        namespace, pod and node, then `relabel_configs`; `options` are the job's other settings (scheme,
        tls_config, metrics_path, ...)."""
        pki_dir = self.run_dir / "pki"
        return {
            "job_name": name,
            "kubernetes_sd_configs": [{"role": "pod", "api_server": self.server, "tls_config": {
                "ca_file": str(pki_dir / "ca.crt"), "cert_file": str(pki_dir / "prometheus.crt"),
                "key_file": str(pki_dir / "prometheus.key")}}],
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
        ])

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


def start(target: cluster.Cluster, timeout: float = 60) -> Prometheus:
    """Start Prometheus for a running cluster with real nodes (once: a second call returns the running one)."""
    if reason := unavailable_reason():
        raise ClusterError(reason)
    state = target.state()
    if not state or state.get("network") is None:
        raise ClusterError("Prometheus scrapes real nodes' pods: start the cluster with real nodes")
    run_dir = target.run_dir
    running = next((p for p in state["processes"] if p["name"] == "prometheus" and cluster.is_running(p)), None)
    if running:
        return Prometheus(f"http://127.0.0.1:{state['ports']['prometheus']}", run_dir, _server(state))
    api = cluster.connect(target)
    try:
        for manifest in yaml.safe_load_all((nodes.MANIFESTS / "prometheus-rbac.yaml").read_text()):
            cluster.create_manifest(api, manifest)
    finally:
        api.close()
    pki.issue_client(run_dir / "pki", "prometheus", "system:prometheus")
    port = cluster.free_port()
    prometheus = Prometheus(f"http://127.0.0.1:{port}", run_dir, _server(state))
    (run_dir / "prometheus" / "data").mkdir(parents=True, exist_ok=True)
    prometheus.reconfigure()
    argv = [shutil.which("prometheus"), f"--config.file={prometheus.config_file}",
            f"--storage.tsdb.path={run_dir / 'prometheus' / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle", "--storage.tsdb.retention.time=2h", "--log.level=warn"]
    state["ports"]["prometheus"] = port
    state["processes"].append(cluster.start_process("prometheus", argv, run_dir / "logs"))
    target.state_file.write_text(json.dumps(state, indent=2))
    cluster.wait_for("Prometheus /-/ready", prometheus._running, timeout, run_dir / "logs" / "prometheus.log")
    return prometheus


def _server(state: dict) -> str:
    return f"https://{state['host']}:{state['ports']['apiserver']}"


def wait_for_series(prometheus: Prometheus, expr: str, timeout: float = 60) -> list[dict]:
    """The first non-empty result of `expr` (Prometheus scrapes every SCRAPE_INTERVAL)."""
    deadline = time.monotonic() + timeout
    while True:
        if result := prometheus.query(expr):
            return result
        if time.monotonic() > deadline:
            raise ClusterError(f"no series for {expr!r} after {timeout:.0f} s; targets: {prometheus.targets()}")
        time.sleep(1)
