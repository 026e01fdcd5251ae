"""Test helpers: the real operator as a process against a cluster, under its own ServiceAccount, for the
e2e tests and benchmarks (what `kopf.testing` is for Kopf, but out of process so it can be SIGKILLed); an
in-memory API server behind `kube.KubeApi` for the unit tests of the handlers; log and audit readers."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from edgeloop import rbac
from edgeloop.kube import Kind, KubeError

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def install_service_account(
    kubectl: Kubectl,
    admin_kubeconfig: Path,
    directory: Path,
    *,
    namespace: str,
    name: str = "edgeloop-operator",
    tls_mode: str = "operator",
) -> Path:
    """Creates the operator's ServiceAccount with the RBAC of edgeloop.rbac and returns a kubeconfig
    that authenticates as it (a short-lived token)."""
    kubectl("create", "namespace", namespace, check=False)
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac.manifests(name, name, namespace, tls_mode)))
    token = kubectl("create", "token", name, "-n", namespace, "--duration=2h").stdout.strip()
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": cluster["name"], "user": name}}],
        "current-context": name,
    }
    path = directory / f"{name}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def service_account_user(namespace: str, name: str = "edgeloop-operator") -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class OperatorProcess:
    """`edgeloop operator` as a child process; its JSON log goes to `log_path`."""

    kubeconfig: Path
    log_path: Path
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    liveness_port: int = 0
    metrics_port: int = 0

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        self.liveness_port, self.metrics_port = _free_port(), _free_port()
        command = [
            str(Path(sys.executable).with_name("edgeloop")), "operator",
            "--liveness", f"http://127.0.0.1:{self.liveness_port}/healthz",
            "--metrics-port", str(self.metrics_port), *self.args,
        ]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.alive():
            if self.process.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the operator's liveness endpoint did not answer; see {self.log_path}")
            time.sleep(0.2)
        return self

    def alive(self) -> bool:
        url = f"http://127.0.0.1:{self.liveness_port}/healthz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
        return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no final writes, as when a node dies or the OOM killer strikes."""
        self.stop(signal.SIGKILL)

    def cpu_seconds(self) -> float:
        """The CPU time the process has used so far (user and system)."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        """The process's peak resident set size so far (VmHWM)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc status")

    def errors(self) -> list[dict]:
        return logged_errors(self.log_path.read_text().splitlines())


def logged_errors(lines: Iterable[str]) -> list[dict]:
    """The error and fatal records of the operator's JSON log. Kopf logs each API request it retries itself
    as an error (a fresh CRD answers 429 for a moment): those are not errors of the operator's."""
    errors = []
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("severity") in ("error", "fatal") and not record["message"].startswith("Request attempt #"):
                errors.append(record)
    return errors


# The Argo CD health checks shipped in docs/gitops (in a source checkout).
ARGOCD_HEALTH = Path(__file__).parents[2] / "docs" / "gitops" / "argocd" / "health" / "edgeloop.io"


def capture_argocd_testdata(kind: str, name: str, body: dict) -> None:
    """With EDGELOOP_CAPTURE_ARGOCD_TESTDATA=DIR (docs/gitops/argocd/health/edgeloop.io), keeps an object seen
    on the devcluster as DIR/<kind>/testdata/<name>.yaml, a case for the health checks' unit tests."""
    if directory := os.environ.get("EDGELOOP_CAPTURE_ARGOCD_TESTDATA"):
        kept = {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec", "status")}
        kept["metadata"] = {k: v for k, v in body["metadata"].items() if k in ("name", "namespace", "generation")}
        target = Path(directory) / kind / "testdata" / f"{name}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(kept, sort_keys=False))


def argocd_health(script: Path, obj: dict) -> dict:
    """An Argo CD health check (health.lua) on `obj`, run by Lua 5.1 with only the libraries Argo CD opens
    (Argo CD runs gopher-lua, Lua 5.1)."""
    import lupa.lua51 as lua51  # a dev dependency: only tests call this

    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    assert runtime.eval("_VERSION") == "Lua 5.1"
    run = runtime.eval(
        "function(source, obj) local env = {obj = obj, ipairs = ipairs, pairs = pairs, tostring = tostring,"
        " tonumber = tonumber, type = type, string = string, table = table, math = math}"
        " local chunk = assert(loadstring(source)); setfenv(chunk, env); return chunk() end"
    )
    result = run(script.read_text(), runtime.table_from(obj, recursive=True))
    return {"status": result["status"], "message": result["message"]}


def audited_calls(audit_log: Path, user: str, since: float, until: float | None = None) -> list[dict]:
    """The API calls `user` made between two wall-clock times, from the API server's audit log."""
    calls = []
    quoted_user = json.dumps(user)  # a cheap test first: the log is hundreds of MB at fleet scale, polled
    # The API server rotates audit.log into audit-<time>.log.
    for path in sorted(audit_log.parent.glob(f"{audit_log.stem}*{audit_log.suffix}")):
        for line in path.read_text().splitlines():
            if quoted_user not in line:
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("user", {}).get("username") != user or event.get("stage") != "ResponseComplete":
                    continue
                stamp = _epoch(event["requestReceivedTimestamp"])
                if stamp >= since and (until is None or stamp <= until):
                    calls.append(event)
    return calls


WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


class FakeKube:
    """An in-memory API server behind `kube.KubeApi`, for unit tests of the handlers.

    `objects` holds what the server holds, by (kind, namespace, name); `calls` records every call as
    ("apply", kind, name), ("get" | "list" | "delete" | "merge_patch" | "patch_status", plural, ...),
    ("log_tail", pod, container, lines) or ("proxy_get", pod, path); a list records its label and field
    selectors joined by a comma. Listing pods or events returns those of `pods` (with the selected labels) or
    `events`; `log` is what a log tail answers and `proxied[pod]` what a pod answers through the proxy (an
    exception is raised); `fail_apply` makes every apply raise.
    """

    WRITES = ("apply", "delete", "merge_patch", "patch_status")

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.pods: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.log: str | Exception = ""
        self.proxied: dict[str, str | Exception] = {}
        self.fail_apply: KubeError | None = None
        self._resource_version = 0

    def writes(self) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] in self.WRITES]

    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Stores `obj` as the server would hold it (a uid, a generation, a resourceVersion); no call recorded."""
        stored = copy.deepcopy(dict(obj))
        metadata = stored["metadata"]
        key = (stored["kind"], metadata.get("namespace", ""), metadata["name"])
        if (existing := self.objects.get(key)) is not None:
            metadata.setdefault("uid", existing["metadata"]["uid"])
            if "status" in existing:
                stored.setdefault("status", existing["status"])
        metadata.setdefault("uid", f"uid-{stored['kind']}-{metadata['name']}")
        metadata.setdefault("generation", 1)
        metadata["resourceVersion"] = self._next_version()
        self.objects[key] = stored
        return copy.deepcopy(stored)

    def indexed(self, kind: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """What a Kopf index of whole bodies of `kind`, by (namespace, name), would hold now."""
        return {(ns, name): [copy.deepcopy(obj)] for (k, ns, name), obj in self.objects.items() if k == kind}

    def _next_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    # ---- KubeApi

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(("apply", manifest["kind"], manifest["metadata"]["name"]))
        if self.fail_apply:
            raise self.fail_apply
        return self.put(manifest)

    def delete(self, kind: Kind, namespace: str, name: str, uid: str) -> None:
        self.calls.append(("delete", kind.plural, name, uid))
        found = self.objects.get((kind.kind, namespace, name))
        if found is not None and found["metadata"]["uid"] == uid:
            del self.objects[(kind.kind, namespace, name)]

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", kind.plural, name))
        return copy.deepcopy(self.objects.get((kind.kind, namespace, name)))

    def list(
        self, kind: Kind, namespace: str, *, label_selector: str = "", field_selector: str = "", page_size: int = 100
    ) -> Iterator[dict[str, Any]]:
        self.calls.append(("list", kind.plural, ",".join(s for s in (label_selector, field_selector) if s)))
        if kind.kind == "Event":
            return iter(copy.deepcopy(self.events))
        wanted = dict(term.split("=", 1) for term in label_selector.split(",") if term)
        candidates = (
            self.pods
            if kind.kind == "Pod"
            else [obj for (k, ns, _), obj in self.objects.items() if k == kind.kind and ns == namespace]
        )
        return iter(
            copy.deepcopy(obj)
            for obj in list(candidates)
            if all(obj["metadata"].get("labels", {}).get(key) == value for key, value in wanted.items())
        )

    def merge_patch(self, kind: Kind, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(("merge_patch", kind.plural, name, copy.deepcopy(dict(patch))))
        target = self.objects.get((kind.kind, namespace, name))
        if target is None:
            raise KubeError(404, f"{kind.plural} {name!r} not found")
        expected = patch.get("metadata", {}).get("resourceVersion")
        if expected is not None and expected != target["metadata"]["resourceVersion"]:
            raise KubeError(409, "the object has been modified; please apply your changes to the latest version")
        _merge(target, {k: v for k, v in patch.items() if k != "metadata"})
        target["metadata"]["resourceVersion"] = self._next_version()
        return copy.deepcopy(target)

    def log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str:
        self.calls.append(("log_tail", pod, container, lines))
        if isinstance(self.log, Exception):
            raise self.log
        return self.log

    def proxy_get(self, namespace: str, pod: str, port: int, path: str, *, https: bool) -> str:
        self.calls.append(("proxy_get", pod, path))
        answer = self.proxied.get(pod, KubeError(503, f"no endpoint for pod {pod}"))
        if isinstance(answer, Exception):
            raise answer
        return answer

    def patch_status(
        self, kind: Kind, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        self.calls.append(("patch_status", kind.plural, name))
        target = self.objects.get((kind.kind, namespace, name))
        if target is None:
            return None
        target["status"] = copy.deepcopy(dict(status))
        target["metadata"]["resourceVersion"] = self._next_version()
        return copy.deepcopy(target)


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """A JSON merge patch (RFC 7386) of `patch` into `target`."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
