"""bench/serve_gpu.py without a GPU: it imports only what a GPU machine has, computes its ratios right, and runs
end to end in its --device cpu smoke mode."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "bench" / "serve_gpu.py"
# A GPU machine has onnxruntime-gpu, numpy and torch (torchvision maybe); nothing of edgeloop's own stack.
ALLOWED = {"numpy", "onnxruntime", "torch", "torchvision", "loadgen"}

_spec = importlib.util.spec_from_file_location("serve_gpu", SCRIPT)
serve_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_gpu)


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__"}


def test_the_gpu_bench_imports_nothing_a_gpu_machine_lacks():
    assert imported(SCRIPT) <= ALLOWED, imported(SCRIPT) - ALLOWED
    assert imported(REPO / "bench" / "serve" / "loadgen.py") <= ALLOWED


def test_ratios_against_the_issues_targets():
    raw = [{"batch": 1, "images_per_s": 700.0, "p50_ms": 1.4}, {"batch": 32, "images_per_s": 4600.0, "p50_ms": 7}]
    own = [
        {"concurrency": 1, "req_per_s": 500.0, "p50_ms": 2.0, "p99_ms": 2.5},
        {"concurrency": 64, "req_per_s": 3800.0, "p50_ms": 16.0, "p99_ms": 90.0},
    ]
    checks = {what: (round(ratio, 3), met) for what, ratio, _, met in serve_gpu.ratios(raw, own)}
    assert checks == {
        "edgeloop c=64 req/s / raw best (batch 32) images/s": (0.826, True),
        "edgeloop c=1 p50 / raw batch-1 p50": (1.429, False),
        "edgeloop c=1 p99 / p50": (1.25, True),
        "edgeloop c=64 p99 / p50": (5.625, False),
    }


def test_the_cpu_smoke_mode_runs_both_sides_and_prints_the_ratios(mlp_path):
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--model", str(mlp_path), "--seconds", "0.5",
               "--batches", "1,8", "--concurrency", "1,4", "--max-batch-size", "8"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "batch 8" in result.stdout and "c=4" in result.stdout
    assert "edgeloop c=4 req/s / raw best" in result.stdout
