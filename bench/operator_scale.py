"""InferenceModel operator at fleet scale on the devcluster: 1000 kwok nodes, 50 InferenceModels at once.

    python bench/operator_scale.py [--nodes 1000] [--models 50] [--rounds 3] [--idle-seconds 300]
                                   [--resync-seconds 60] [--peer-only]

The fleet is split into one site per model (labelled bench.edgeloop.io/site, each a mix of NPU, GPU and
CPU-only nodes), and each InferenceModel serves [npu, gpu, cpu] on its site, so the controllers create one
pod per node. Measured, in --rounds rounds on the same cluster (this machine is noisy, so each round runs
the peer and the operator back to back, and the medians are compared):

- peer: `kubectl apply --server-side` of the very objects the operator renders for the models (DaemonSets
  and Services), with no operator: what the control plane alone needs, until every DaemonSet is ready;
- operator: `kubectl apply --server-side` of the 50 InferenceModels to the running operator, until every
  model reports Ready for its generation;
- the operator's start (its watches listed and indexed, before it runs any handler), its peak RSS (VmHWM),
  and its API calls during an idle window with a resync every --resync-seconds, from the API server's audit
  log (the operator runs as its own ServiceAccount, with the RBAC of edgeloop.rbac).

--peer-only measures the peer alone (for tuning the devcluster). The bench also prints when each run's pods
were created, scheduled and Ready (median and last, in seconds after the apply).

Targets (issue 3): all Ready within 60 s, peak RSS under 250 MiB, zero writes while idle.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import yaml
from devcluster.fleet import Fleet, NodeGroup
from edgeloop import config
from edgeloop.api.inferencemodel import InferenceModelSpec
from edgeloop.render.inferencemodel import owner_of, render
from edgeloop.testing import WRITE_VERBS, OperatorProcess, audited_calls, install_service_account, service_account_user

from devcluster import build, cluster

ROOT = Path(__file__).parents[1]
SITE_LABEL = "bench.edgeloop.io/site"
# k3s ships this RuntimeClass for GPU nodes; the gpu variant's pods need it to be admitted.
RUNTIME_CLASS = {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "nvidia"},
                 "handler": "nvidia"}
SHA = "5f0c3d8e2a1b4c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f"
# Per site: 30% NPU, 30% GPU, 40% CPU-only nodes.
MIX = (("npu", 0.3, {"edgeloop.io/accelerator.npu": "true"}, {"npu.intel.com/accel": "1"}),
       ("gpu", 0.3, {"edgeloop.io/accelerator.gpu": "true", "nvidia.com/gpu.present": "true"}, {"nvidia.com/gpu": "1"}),
       ("cpu", 0.4, {}, {}))


def site(index: int) -> str:
    return f"site-{index:02d}"


def fleet(nodes: int, sites: int) -> Fleet:
    groups = []
    for index in range(sites):
        size = nodes // sites + (1 if index < nodes % sites else 0)
        counts = [int(size * share) for _, share, _, _ in MIX]
        counts[-1] = size - sum(counts[:-1])
        for (kind, _, labels, capacity), count in zip(MIX, counts, strict=True):
            groups.append(NodeGroup(name=f"{site(index)}-{kind}", count=count,
                                    labels={**labels, SITE_LABEL: site(index)}, capacity=capacity))
    return Fleet(groups=groups)


def model_spec(index: int) -> dict:
    return {
        "model": {"uri": f"http://edgeloop-store:8000/sha256/{SHA}", "sha256": SHA, "version": "1"},
        "placement": {"accelerators": ["npu", "gpu", "cpu"], "nodeSelector": {SITE_LABEL: site(index)}},
    }


def inference_models(count: int, namespace: str) -> list[dict]:
    return [{"apiVersion": "edgeloop.io/v1alpha1", "kind": "InferenceModel",
             "metadata": {"name": f"model-{i:02d}", "namespace": namespace}, "spec": model_spec(i)}
            for i in range(count)]


def peer_objects(count: int, namespace: str) -> list[dict]:
    """The DaemonSets and Services the operator would render, without the owner (nothing would own them)."""
    objects = []
    for i in range(count):
        owner = owner_of(f"model-{i:02d}", namespace, "00000000-0000-0000-0000-000000000000")
        for rendered in render(owner, InferenceModelSpec.model_validate(model_spec(i)), config.build()).all():
            manifest = copy.deepcopy(rendered)
            del manifest["metadata"]["ownerReferences"]
            objects.append(manifest)
    return objects


class Bench:
    def __init__(self, target: cluster.Cluster, bin_dir: Path):
        self.target = target
        self.bin_dir = bin_dir
        self._api: cluster.Api | None = None

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(self.bin_dir / "kubectl"), f"--kubeconfig={self.target.kubeconfig}", *args],
                                input=input, capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr}")
        return result

    def get(self, path: str) -> list[dict]:
        """The items of a list, straight from the API server: the polls run twice a second during the
        rollout, and a kubectl process per poll would take a good part of a core from the control plane."""
        if self._api is None:
            state = self.target.state()
            self._api = cluster.Api(state.get("host", "127.0.0.1"), state["ports"]["apiserver"],
                                    self.target.run_dir / "pki")
        status, body = self._api.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body["items"]

    def apply(self, namespace: str, objects: list[dict]) -> tuple[float, float]:
        """Creates the namespace and applies the objects in it, server-side; returns the wall-clock and the
        monotonic time of the apply."""
        self.kubectl("create", "namespace", namespace)
        applied_at, started = time.time(), time.monotonic()
        self.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(objects))
        return applied_at, started

    def delete_namespace(self, namespace: str, timeout: float) -> None:
        """Deletes the namespace and waits until it is gone, so that the next run starts on a quiet cluster."""
        self.kubectl("delete", "namespace", namespace, "--wait=false")
        self.wait(f"namespace {namespace} deleted",
                  lambda: namespace not in {n["metadata"]["name"] for n in self.get("/api/v1/namespaces")}, timeout)

    def timeline(self, namespace: str, applied_at: float) -> str:
        return pod_timeline(self.get(f"/api/v1/namespaces/{namespace}/pods"), applied_at)

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    def wait(self, what: str, done, timeout: float, operator: OperatorProcess | None = None) -> float:
        started = time.monotonic()
        while not done():
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{what}: not done after {timeout:.0f} s")
            if operator and operator.process.poll() is not None:
                raise RuntimeError(f"the operator exited with {operator.process.returncode}: {operator.log_path}")
            time.sleep(0.5)
        return time.monotonic() - started


def all_ready(items: list[dict], expected: int) -> bool:
    def ready(im: dict) -> bool:
        status = im.get("status", {})
        return status.get("observedGeneration") == im["metadata"]["generation"] and any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))

    return len(items) == expected and all(ready(im) for im in items)


def daemon_sets_ready(items: list[dict], expected: int) -> bool:
    def ready(ds: dict) -> bool:
        status = ds.get("status", {})
        return (status.get("observedGeneration") == ds["metadata"]["generation"]
                and status.get("numberReady", -1) == status.get("desiredNumberScheduled")
                and status.get("updatedNumberScheduled") == status.get("desiredNumberScheduled"))

    return len(items) == expected and all(ready(ds) for ds in items)


def pod_timeline(pods: list[dict], applied_at: float) -> str:
    """When the pods were created, scheduled and Ready: median and last, in seconds after `applied_at`."""
    def seconds(stamp: str | None) -> float | None:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - applied_at if stamp else None

    def condition(pod: dict, kind: str) -> str | None:
        return next((c.get("lastTransitionTime") for c in pod.get("status", {}).get("conditions", [])
                     if c["type"] == kind and c["status"] == "True"), None)

    columns = {"created": [seconds(p["metadata"]["creationTimestamp"]) for p in pods],
               "scheduled": [seconds(condition(p, "PodScheduled")) for p in pods],
               "ready": [seconds(condition(p, "Ready")) for p in pods]}
    parts = []
    for name, values in columns.items():
        known = sorted(v for v in values if v is not None)
        if known:
            parts.append(f"{name} p50 {known[len(known) // 2]:.0f} s, last {known[-1]:.0f} s")
    return "; ".join(parts)


def measure_peer(bench: Bench, namespace: str, args: argparse.Namespace) -> tuple[float, str]:
    """Seconds from the apply of the rendered objects to every DaemonSet ready, and the pods' timeline."""
    applied_at, started = bench.apply(namespace, peer_objects(args.models, namespace))
    bench.wait("peer DaemonSets ready",
               lambda: daemon_sets_ready(bench.get(f"/apis/apps/v1/namespaces/{namespace}/daemonsets"),
                                         3 * args.models), args.timeout)
    return time.monotonic() - started, bench.timeline(namespace, applied_at)


def measure_operator(bench: Bench, operator: OperatorProcess, namespace: str, user: str,
                     args: argparse.Namespace) -> dict:
    """The InferenceModels applied at once to the running operator: seconds to all Ready; on the way, when
    the operator had created every DaemonSet and when the control plane had made them all ready (the rest
    is the operator's status lag); its API writes during the rollout."""
    expected_ds = 3 * args.models
    found: dict = {}
    applied_at, started = bench.apply(namespace, inference_models(args.models, namespace))

    def rolled_out() -> bool:
        elapsed = time.monotonic() - started
        daemon_sets = bench.get(f"/apis/apps/v1/namespaces/{namespace}/daemonsets")
        if len(daemon_sets) == expected_ds:
            found.setdefault("daemon_sets_created_s", elapsed)
        if daemon_sets_ready(daemon_sets, expected_ds):
            found.setdefault("daemon_sets_ready_s", elapsed)
        done = all_ready(bench.get(f"/apis/edgeloop.io/v1alpha1/namespaces/{namespace}/inferencemodels"),
                         args.models)
        if done:  # the DaemonSets became ready after they were polled, within this poll
            found.setdefault("daemon_sets_ready_s", time.monotonic() - started)
        return done

    bench.wait("InferenceModels Ready", rolled_out, args.timeout, operator)
    found["ready_s"] = time.monotonic() - started
    calls = audited_calls(bench.target.run_dir / "audit.log", user, applied_at, time.time())
    found["calls"] = len(calls)
    found["writes"] = dict(Counter(_resource(c) for c in calls if c["verb"] in WRITE_VERBS))
    found["pods"] = bench.timeline(namespace, applied_at)
    return found


def measure_idle(bench: Bench, user: str, args: argparse.Namespace) -> tuple[Counter, Counter]:
    """The operator's writes and reads while nothing changes but its periodic resyncs."""
    time.sleep(10)  # the last status writes and events of the rollout
    since = time.time()
    time.sleep(args.idle_seconds)
    calls = audited_calls(bench.target.run_dir / "audit.log", user, since, time.time())
    return (Counter(f"{c['verb']} {_resource(c)}" for c in calls if c["verb"] in WRITE_VERBS),
            Counter(c["verb"] for c in calls if c["verb"] not in WRITE_VERBS))


def _resource(call: dict) -> str:
    ref = call["objectRef"]
    return ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")


def _seconds(values) -> str:
    return ", ".join(f"{value:.1f}" for value in values)


def wait_until_started(bench: Bench, operator: OperatorProcess, user: str, launched: float, timeout: float) -> float:
    """Seconds from the operator's start until it has listed the nodes (the audit log shows the list) and
    its CPU time then stands still for 2 s: its indexes are built, which Kopf finishes before it runs any
    handler."""
    since = time.time() - 60
    bench.wait("the operator's list of the nodes", lambda: any(
        c["verb"] == "list" and c["objectRef"].get("resource") == "nodes"
        for c in audited_calls(bench.target.run_dir / "audit.log", user, since)), timeout)
    quiet = 0
    while quiet < 2:
        before = operator.cpu_seconds()
        time.sleep(1)
        quiet = quiet + 1 if operator.cpu_seconds() - before < 0.05 else 0
        if time.monotonic() - launched > timeout:
            raise TimeoutError(f"the operator was still busy {timeout:.0f} s after its start")
    return time.monotonic() - launched - 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="peer and operator runs, back to back (default 3)")
    parser.add_argument("--idle-seconds", type=float, default=300)
    parser.add_argument("--resync-seconds", type=float, default=60)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--peer-only", action="store_true", help="measure the peer alone, not the operator")
    args = parser.parse_args()
    # A SIGTERM (a CI timeout) still stops the operator and the cluster through the finally clause below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    bin_dir = build.build()
    target = cluster.Cluster.named("bench-operator")
    bench = Bench(target, bin_dir)
    rows: list[tuple[str, str]] = []
    results: dict = {"rounds": []}
    with target.locked():
        cluster.down(target)
        started = time.monotonic()
        cluster.up(target, bin_dir, fleet(args.nodes, args.models), timeout=args.timeout)
        rows.append((f"devcluster up, {args.nodes} kwok nodes Ready", f"{time.monotonic() - started:.0f} s"))
    scratch = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    operator = None
    user = service_account_user("edgeloop-bench")
    try:
        bench.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        bench.wait("the CRDs established", lambda: all(
            any(c["type"] == "Established" and c["status"] == "True"
                for c in (crd.get("status") or {}).get("conditions") or [])
            for crd in bench.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")), 60)
        bench.kubectl("apply", "-f", "-", input=yaml.safe_dump(RUNTIME_CLASS))
        if not args.peer_only:
            kubeconfig = install_service_account(bench.kubectl, target.kubeconfig, scratch, namespace="edgeloop-bench")
            # Watching only the bench's namespaces: the peer's DaemonSets carry the operator's labels. Kopf
            # watches Nodes only once a namespace it serves exists, so one does from the start: the nodes are
            # listed and indexed now, not when the first models arrive.
            bench.kubectl("create", "namespace", "bench-op")
            launched = time.monotonic()
            operator = OperatorProcess(kubeconfig, scratch / "operator.log",
                                       ("--namespace", "bench-op*", "--resync-seconds", str(args.resync_seconds))
                                       ).start()
            results["operator_start_s"] = wait_until_started(bench, operator, user, launched, args.timeout)
            rows.append((f"operator start: watches listed, {args.nodes} nodes indexed",
                         f"{results['operator_start_s']:.1f} s"))

        # The first peer run warms the control plane up (informers, scheduler caches) and is not reported.
        measure_peer(bench, "bench-warm-up", args)
        bench.delete_namespace("bench-warm-up", args.timeout)
        for index in range(args.rounds):
            peer_s, timeline = measure_peer(bench, f"bench-peer-{index}", args)
            bench.delete_namespace(f"bench-peer-{index}", args.timeout)
            this_round = {"peer_ready_s": peer_s, "peer_pods": timeline}
            results["rounds"].append(this_round)
            print(f"round {index}: peer {peer_s:.1f} s; pods {timeline}", file=sys.stderr)
            if args.peer_only:
                continue
            namespace = f"bench-op-{index}"
            this_round.update(measure_operator(bench, operator, namespace, user, args))
            print(f"round {index}: operator {this_round['ready_s']:.1f} s; pods {this_round['pods']}", file=sys.stderr)
            if index < args.rounds - 1:  # the last round's models stay for the idle window
                bench.delete_namespace(namespace, args.timeout)

        rounds = results["rounds"]
        results["peer_ready_s"] = statistics.median(r["peer_ready_s"] for r in rounds)
        rows.append((f"peer: kubectl apply of the {3 * args.models} DaemonSets and {args.models} Services "
                     f"({args.nodes} pods), all ready, median of {len(rounds)}",
                     f"{results['peer_ready_s']:.1f} s  ({_seconds(r['peer_ready_s'] for r in rounds)})"))
        if not args.peer_only:
            results["operator_ready_s"] = statistics.median(r["ready_s"] for r in rounds)
            last = rounds[-1]
            rows += [
                (f"operator: {args.models} InferenceModels applied at once, all Ready, median of {len(rounds)}",
                 f"{results['operator_ready_s']:.1f} s  ({_seconds(r['ready_s'] for r in rounds)})"),
                ("  ratio operator / peer, per round",
                 ", ".join(f"{r['ready_s'] / r['peer_ready_s']:.2f}x" for r in rounds)),
                ("  last round: every DaemonSet created by the operator",
                 f"{last.get('daemon_sets_created_s', float('nan')):.1f} s"),
                ("  last round: every DaemonSet ready (control plane)",
                 f"{last.get('daemon_sets_ready_s', float('nan')):.1f} s"),
                (f"  last round: operator API calls during the rollout: {last['calls']}",
                 f"writes by resource: {last['writes']}"),
            ]
            writes, reads = measure_idle(bench, user, args)
            results["idle_writes"] = sum(writes.values())
            results["peak_rss_mib"] = operator.peak_rss_mib()
            rows += [
                ("operator peak RSS (VmHWM), whole run", f"{results['peak_rss_mib']:.0f} MiB  (target < 250 MiB)"),
                (f"operator API writes in {args.idle_seconds:.0f} s idle, resync every {args.resync_seconds:.0f} s",
                 f"{results['idle_writes']}  (target 0) {dict(writes) or ''}"),
                ("operator API reads in the same window", f"{sum(reads.values())} {dict(reads)}"),
            ]
        rows.append(("target: all Ready within", "60 s"))
    except Exception:
        # What was not ready, for the post-mortem, while the cluster still exists.
        (scratch / "state.yaml").write_text(bench.kubectl(
            "get", "inferencemodels,daemonsets,pods", "-A", "-o", "yaml", check=False).stdout)
        raise
    finally:
        if operator:
            operator.stop()
        bench.close()
        shutil.copytree(target.run_dir / "logs", scratch / "cluster-logs", dirs_exist_ok=True)
        print(f"logs: {scratch}", file=sys.stderr)
        with target.locked():
            cluster.down(target)

    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.peer_only:
        return 0 if results["peer_ready_s"] <= 60 else 1
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "operator_scale.json").write_text(json.dumps({"args": vars(args), **results}, indent=2))
    ok = results["operator_ready_s"] <= 60 and results["peak_rss_mib"] < 250 and results["idle_writes"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
