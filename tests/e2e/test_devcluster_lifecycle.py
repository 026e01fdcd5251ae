"""devcluster up/down on a cluster of its own: idempotent up, recovery after a killed run, exact down."""

from __future__ import annotations

import os
import signal

import pytest
from devcluster.fleet import Fleet

from devcluster import build, cluster

ONE_NODE = Fleet.model_validate({"groups": [{"name": "lifecycle", "count": 1}]})


@pytest.fixture
def scratch_cluster(tmp_path):
    target = cluster.Cluster(tmp_path / "lifecycle")
    yield target
    cluster.down(target)


def test_up_twice_is_harmless_and_down_stops_exactly_its_processes(scratch_cluster):
    bin_dir = build.build()
    cluster.up(scratch_cluster, bin_dir, ONE_NODE, log=lambda _: None)
    first = scratch_cluster.state()["processes"]

    messages = []
    cluster.up(scratch_cluster, bin_dir, ONE_NODE.scaled_to(2), log=messages.append)
    assert scratch_cluster.state()["processes"] == first, "a second up must not restart anything"
    assert any("already up" in m for m in messages)
    assert cluster.status(scratch_cluster)["nodes"] == {"total": 2, "ready": 2}

    assert cluster.down(scratch_cluster)
    assert not any(cluster.is_running(p) for p in first)
    assert not scratch_cluster.run_dir.exists()
    assert not cluster.down(scratch_cluster), "down of a stopped cluster reports nothing to stop"


def test_a_run_directory_left_by_a_killed_run_is_recovered(scratch_cluster):
    bin_dir = build.build()
    cluster.up(scratch_cluster, bin_dir, ONE_NODE, log=lambda _: None)
    killed = scratch_cluster.state()["processes"]
    apiserver = next(p for p in killed if p["name"] == "kube-apiserver")
    os.kill(apiserver["pid"], signal.SIGKILL)  # as if the machine lost it; the rest keep running

    messages = []
    cluster.up(scratch_cluster, bin_dir, ONE_NODE, log=messages.append)
    assert any("recovering" in m for m in messages)
    assert not any(cluster.is_running(p) for p in killed), "leftover processes of the old run are stopped"
    assert cluster.is_healthy(scratch_cluster)
    assert cluster.status(scratch_cluster)["nodes"] == {"total": 1, "ready": 1}
