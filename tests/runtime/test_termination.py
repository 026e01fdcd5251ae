"""The runtime's processes stop on SIGTERM as their pod's PID 1 (a PID namespace of their own, as in a
container), where the kernel spares a process every signal it has no handler for."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edgeloop_runtime.federated.model import mlp
from fed_processes import free_port

pytestmark = pytest.mark.skipif(
    not shutil.which("unshare") or os.geteuid() != 0, reason="needs unshare and root (a PID namespace)"
)


def store(tmp_path: Path) -> tuple[list[str], str]:
    return ["store", "--root", str(tmp_path / "store"), "--host", "127.0.0.1", "--port", str(free_port())], "serving"


def aggregator(tmp_path: Path) -> tuple[list[str], str]:
    (tmp_path / "m.onnx").write_bytes(mlp([64, 32, 10], seed=0))
    return ["federated", "aggregate", "--model", str(tmp_path / "m.onnx"), "--clients", "3", "--host", "127.0.0.1",
            "--port", str(free_port()), "--state-dir", str(tmp_path / "state")], "open"  # fmt: skip


@pytest.mark.parametrize("command", [store, aggregator])
def test_a_pid_1_stops_on_sigterm(tmp_path, command):
    """Deleted mid-job, the aggregator ran on through the pod's grace period (training rounds its successor could
    not resume), and a deleted store held its volume as long."""
    args, started = command(tmp_path)
    log = tmp_path / "log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "edgeloop_runtime.cli", *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "EDGELOOP_STORE_TOKEN": "t"})  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while started.encode() not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        [pid_1] = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()  # unshare's child
        os.kill(int(pid_1), signal.SIGTERM)
        assert process.wait(10) == 128 + signal.SIGTERM, log.read_text()
        assert "terminated (SIGTERM)" in log.read_text()
    finally:
        process.kill()
        process.wait()
