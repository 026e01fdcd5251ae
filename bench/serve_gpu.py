"""bench/serve_gpu.py: edgeloop against raw onnxruntime on one GPU, ResNet-50 with a dynamic batch dimension.

    python bench/serve_gpu.py                        # on a machine with an NVIDIA GPU and onnxruntime-gpu
    python bench/serve_gpu.py --device cpu --seconds 2 --model model.onnx --batches 1,8 --concurrency 1,8  # smoke

In one run: raw onnxruntime at batch 1, 8, 32 and 64 (one caller, the images/s the GPU gives), then edgeloop
serving the same file at concurrency 1, 8, 32 and 64 (closed-loop clients, one image per request, the binary
tensor extension), and the ratios against the targets of issue 12:
  - edgeloop at c=64 >= 80% of raw onnxruntime's best batched images/s;
  - edgeloop c=1 p50 <= 1.3x raw batch-1 p50;
  - p99 <= 5x p50 once warm.
Both sides use the same provider options (CUDA: cudnn_conv_algo_search HEURISTIC) and 1 intra-op thread.

Needs only numpy and onnxruntime(-gpu), plus torch to export ResNet-50 (torchvision's when installed, else
an equivalent built here) unless --model names an ONNX file whose first dimension is dynamic. The edgeloop
server needs its serving dependencies (uvloop, httptools, orjson): when the python running this lacks them,
a venv under bench/.venvs/gpu (with the system's site-packages, so onnxruntime-gpu and numpy are reused) gets
them from PyPI, or, offline, from --wheelhouse DIR (made beforehand with
`pip download --only-binary=:all: -d DIR uvloop httptools orjson` for the target's Python and platform).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "serve"))
import loadgen  # noqa: E402 (plain asyncio and numpy)

PROVIDERS = {"gpu": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
PROVIDER_OPTIONS = {"gpu": {"cudnn_conv_algo_search": "HEURISTIC"}, "cpu": {}}
SERVING_MODULES = ("uvloop", "httptools", "orjson")


# --- the model --------------------------------------------------------------------------------------------


def resnet50_onnx(path: Path) -> Path:
    """ResNet-50 (random weights: speed does not depend on them) exported with a dynamic batch dimension."""
    import torch

    try:
        from torchvision.models import resnet50

        model = resnet50(weights=None)
    except ImportError:
        model = _resnet50(torch.nn)
    model.eval()
    arguments = {"input_names": ["input"], "output_names": ["logits"], "opset_version": 17,
                 "dynamic_axes": {"input": {0: "N"}, "logits": {0: "N"}}}  # fmt: skip
    try:  # the TorchScript exporter: torch >= 2.9 defaults to the dynamo one, which needs onnxscript
        torch.onnx.export(model, torch.randn(1, 3, 224, 224), str(path), dynamo=False, **arguments)
    except TypeError:  # torch < 2.5 has no dynamo argument
        torch.onnx.export(model, torch.randn(1, 3, 224, 224), str(path), **arguments)
    return path


def _resnet50(nn):
    """torchvision's ResNet-50 layout (bottleneck blocks 3, 4, 6, 3) for a machine without torchvision."""

    class Bottleneck(nn.Module):
        def __init__(self, inplanes, planes, stride):
            super().__init__()
            width, out = planes, planes * 4
            self.body = nn.Sequential(
                nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out),
            )  # fmt: skip
            self.down = None
            if stride != 1 or inplanes != out:
                self.down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.body(x) + (self.down(x) if self.down is not None else x))

    layers, inplanes = [], 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(inplanes, planes, stride if i == 0 else 1))
            inplanes = planes * 4
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000),
    )  # fmt: skip


def signature(path: Path) -> tuple[str, list[int]]:
    """The model's single input and the shape of one sample (its dimension 0 must be dynamic)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (node,) = session.get_inputs()
    if isinstance(node.shape[0], int):
        raise SystemExit(f"{path}: input {node.name} has a fixed first dimension {node.shape[0]}; batching needs N")
    return node.name, [d if isinstance(d, int) else 1 for d in node.shape[1:]]


# --- measuring ----------------------------------------------------------------------------------------------


def measure_raw(path: Path, device: str, batch: int, sample: list[int], seconds: float) -> dict:
    """One caller running batches of `batch` back to back: images/s and the p50 of one run."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    provider = PROVIDERS[device]
    session = ort.InferenceSession(
        str(path), options, providers=[provider], provider_options=[PROVIDER_OPTIONS[device]]
    )
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).random([batch, *sample], dtype=np.float32)
    for _ in range(3):  # warm: the cuDNN search of this shape
        session.run(None, {name: x})
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        session.run(None, {name: x})
        latencies.append(time.perf_counter() - started)
    total = sum(latencies)
    return {"batch": batch, "images_per_s": batch * len(latencies) / total, "p50_ms": percentile(latencies, 50)}


def percentile(values, q: float) -> float:
    return float(np.percentile(np.array(values), q)) * 1000 if len(values) else float("nan")


def serving_python(wheelhouse: Path | None) -> str:
    """A python that has the server's dependencies: this one, or a venv given them."""
    probe = f"import {', '.join(SERVING_MODULES)}"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
        return sys.executable
    venv = ROOT / "bench" / ".venvs" / "gpu"
    python = venv / "bin" / "python"
    if not python.exists() or subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        print(f"installing {', '.join(SERVING_MODULES)} into {venv} (system site-packages reused) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        source = ["--no-index", "--find-links", str(wheelhouse)] if wheelhouse else []
        subprocess.run([python, "-m", "pip", "install", "-q", *source, *SERVING_MODULES], check=True)
    return str(python)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(python: str, path: Path, device: str, port: int, max_batch: int) -> list[str]:
    return [
        python, "-m", "edgeloop_runtime.cli", "serve", "--model-path", str(path), "--model-name", "model",
        "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", "0", "--threads", "1",
        "--execution-providers", PROVIDERS[device],
        "--provider-options", json.dumps({PROVIDERS[device]: PROVIDER_OPTIONS[device]}),
        "--max-batch-size", str(max_batch), "--log-level", "INFO",
    ]  # fmt: skip


@contextmanager
def edgeloop(python: str, path: Path, device: str, max_batch: int, log: Path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "runtime-image")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(server_command(python, path, device, port, max_batch), stdout=out,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 600  # the warm-up of every batch size comes first
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"edgeloop did not become ready:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(60)


def infer_request(port: int, name: str, sample: list[int]) -> bytes:
    x = np.random.default_rng(0).random([1, *sample], dtype=np.float32)
    header = json.dumps({
        "inputs": [{"name": name, "datatype": "FP32", "shape": [1, *sample],
                    "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()  # fmt: skip
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return loadgen.build_request("127.0.0.1", port, "/v2/models/model/infer", header + x.tobytes(), headers)


def measure_edgeloop(port: int, request: bytes, concurrency: int, seconds: float) -> dict:
    import asyncio

    result = asyncio.run(loadgen.run("127.0.0.1", port, request, concurrency=concurrency, seconds=seconds,
                                     max_requests=10**9, warmup=50))  # fmt: skip
    return {"concurrency": concurrency, "req_per_s": result.rps, "p50_ms": result.percentile(50),
            "p99_ms": result.percentile(99), "errors": result.errors}  # fmt: skip


# --- the report ---------------------------------------------------------------------------------------------


def ratios(raw: list[dict], own: list[dict]) -> list[tuple[str, float, float, bool]]:
    """(what, ratio, target, met) for the issue's targets, from what was measured."""
    checks = []
    best = max(raw, key=lambda r: r["images_per_s"])
    top = max(own, key=lambda r: r["concurrency"])
    ratio = top["req_per_s"] / best["images_per_s"]
    what = f"edgeloop c={top['concurrency']} req/s / raw best (batch {best['batch']}) images/s"
    checks.append((what, ratio, 0.8, ratio >= 0.8))
    single = next((r for r in raw if r["batch"] == 1), None)
    lone = next((r for r in own if r["concurrency"] == 1), None)
    if single and lone:
        ratio = lone["p50_ms"] / single["p50_ms"]
        checks.append(("edgeloop c=1 p50 / raw batch-1 p50", ratio, 1.3, ratio <= 1.3))
    for row in own:
        ratio = row["p99_ms"] / row["p50_ms"]
        checks.append((f"edgeloop c={row['concurrency']} p99 / p50", ratio, 5.0, ratio <= 5.0))
    return checks


def report(device: str, raw: list[dict], own: list[dict]) -> str:
    lines = [f"device {device}: {ort.get_device()} onnxruntime {ort.__version__}, providers {PROVIDERS[device]} "
             f"{PROVIDER_OPTIONS[device]}, 1 intra-op thread", "",
             f"{'raw onnxruntime':<18}{'images/s':>10}{'p50 ms':>9}"]  # fmt: skip
    lines += [f"  batch {r['batch']:<10}{r['images_per_s']:>10.0f}{r['p50_ms']:>9.2f}" for r in raw]
    lines += ["", f"{'edgeloop':<18}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"]
    lines += [f"  c={r['concurrency']:<14}{r['req_per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>8}"
              for r in own]  # fmt: skip
    lines += ["", "targets:"]
    for what, ratio, target, met in ratios(raw, own):
        sign = ">=" if target < 1 else "<="
        lines.append(f"  {what}: {ratio:.2f} (target {sign} {target}): {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(PROVIDERS), default="gpu")
    parser.add_argument("--model", type=Path, help="an ONNX file with a dynamic first dimension (default: ResNet-50)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement (default %(default)s)")
    parser.add_argument("--batches", default="1,8,32,64", help="raw onnxruntime batch sizes")
    parser.add_argument("--concurrency", default="1,8,32,64", help="edgeloop client concurrency")
    parser.add_argument("--max-batch-size", type=int, default=64, help="edgeloop's (default %(default)s)")
    parser.add_argument("--wheelhouse", type=Path, help="offline: wheels of uvloop, httptools and orjson")
    args = parser.parse_args()
    if args.device == "gpu" and PROVIDERS["gpu"] not in ort.get_available_providers():
        parser.error(f"{PROVIDERS['gpu']} is not available here ({ort.get_available_providers()}): "
                     "install onnxruntime-gpu[cuda,cudnn], or use --device cpu for a smoke run")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-serve-gpu-") as workdir:
        path = args.model or resnet50_onnx(Path(workdir) / "resnet50.onnx")
        name, sample = signature(path)
        raw = [measure_raw(path, args.device, int(b), sample, args.seconds) for b in args.batches.split(",")]
        python = serving_python(args.wheelhouse)
        with edgeloop(python, path, args.device, args.max_batch_size, Path(workdir) / "edgeloop.log") as port:
            request = infer_request(port, name, sample)
            own = [measure_edgeloop(port, request, int(c), args.seconds) for c in args.concurrency.split(",")]
    text = report(args.device, raw, own)
    print(text)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"serve_gpu_{args.device}.json").write_text(json.dumps({"raw": raw, "edgeloop": own}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
