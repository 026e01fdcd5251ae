"""The e2e tier: one devcluster (a real kube-apiserver, controller-manager, scheduler and etcd, with a
kwok-simulated edge fleet) for the whole session, driven with the real kubectl."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from devcluster.fleet import load_fleet

from devcluster import build, cluster, offline


@dataclass(frozen=True)
class DevCluster:
    kubeconfig: Path
    bin_dir: Path
    run_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{self.bin_dir}:{os.environ['PATH']}"}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), *args], input=input, env=self.env, capture_output=True, text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    @property
    def cluster(self) -> cluster.Cluster:
        return cluster.Cluster(self.run_dir)

    def set_offline(self, *names: str, offline_: bool = True, wait: float | None = 90.0) -> None:
        """Cut nodes off from the control plane (kwok: silent; real: partitioned) or bring them back
        (`offline_=False`), waiting until their Ready condition says so (offline: ~30 s, the grace period)."""
        offline.set_offline(self.cluster, list(names), offline_, wait)

    @contextlib.contextmanager
    def offline(self, *names: str, wait: float | None = 90.0):
        """Nodes offline for the block, and back (Ready) afterwards whatever happened in it."""
        self.set_offline(*names, wait=wait)
        try:
            yield
        finally:
            self.set_offline(*names, offline_=False, wait=wait)

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Wait until the CRDs are Established. (`kubectl wait` fails at once on a CRD so new that it has
        no status conditions yet, so poll instead.)"""
        deadline = time.monotonic() + timeout
        while True:
            items = [self.get_json(f"crd/{name}") for name in crds]
            if all(any(c["type"] == "Established" and c["status"] == "True"
                       for c in item.get("status", {}).get("conditions") or []) for item in items):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"CRDs {crds} not Established after {timeout:.0f} s")
            time.sleep(0.2)


def wait_for(what: str, check: Callable[[], object], timeout: float = 90.0, debug: Callable[[], str] = str):
    """Poll `check` until it returns something true, and return that; fail with `debug()` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{debug()}")


@pytest.fixture(scope="session")
def devcluster() -> DevCluster:
    """Brought up once per test session (its own run directory, apart from `make demo`'s) and taken down.

    The session holds the cluster's lock throughout, so a second test session waits for this one
    rather than sharing (and tearing down) a cluster whose nodes the tests relabel."""
    target = cluster.Cluster.named(os.environ.get("EDGELOOP_E2E_CLUSTER", "e2e"))
    bin_dir = build.build()
    with target.locked():
        cluster.up(target, bin_dir, load_fleet())
        yield DevCluster(kubeconfig=target.kubeconfig, bin_dir=bin_dir, run_dir=target.run_dir)
        cluster.down(target)


def pytest_collection_modifyitems(items):
    """Every test under tests/e2e is an e2e test."""
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def namespace(devcluster: DevCluster, request) -> str:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid() % 10000}"
    devcluster.kubectl("create", "namespace", name)
    yield name
    devcluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
