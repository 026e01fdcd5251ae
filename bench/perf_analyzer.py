"""bench/perf_analyzer: Triton's own load tool against edgeloop and KServe, in one run, with ratios.

    .venv/bin/python bench/perf_analyzer.py [--seconds 2] [--rounds 3]

What it measures, each with perf_analyzer 2.60 as a Triton user runs it:
- the digits MLP over HTTP (binary tensors) and gRPC, at concurrency 1 and 8, on edgeloop and on KServe's
  ModelServer (both with onnxruntime, one intra-op thread); edgeloop's gRPC also with --streaming;
- squeezenet with --shared-memory system (HTTP and gRPC) against raw onnxruntime run() called in-process.
Each figure is the median of --rounds measurements, the contenders taking turns so that they meet the same
load from whatever else runs on the machine. Targets (issue 17): edgeloop gRPC >= 0.8x edgeloop HTTP infer/s
at c=1 and c=8; edgeloop gRPC above KServe gRPC; squeezenet shm c=1 p50 <= 1.10x raw run() p50. The
server-side breakdown perf_analyzer prints (queue, compute input/infer/output) is checked against its
client latency: the server's part must not exceed it. Writes JSON to bench/results/perf_analyzer.json.

Sets itself up under bench/.venvs/perf_analyzer: perf_analyzer needs glibc >= 2.38, which Debian 12 lacks, so
its PyPI wheel (manylinux_2_38) runs through the loader of Debian 13's libc6, libstdc++6 and libgcc-s1,
unpacked there with dpkg-deb -x (pinned below by version and sha256) and never installed on the system. Its
shared-memory mode loads libcudart.so even for system shared memory: the CUDA runtime's wheel provides it
(no GPU is used).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "serve"))
import run as serve_bench  # bench/serve/run.py: its models, servers and raw onnxruntime

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "bench" / ".venvs" / "perf_analyzer"
RESULTS = ROOT / "bench" / "results"
WHEELS = {
    "perf-analyzer==2.60.0": "manylinux_2_38_x86_64",
    "nvidia-cuda-runtime-cu12==12.9.79": "manylinux_2_17_x86_64",
}
DEBIAN = "http://deb.debian.org/debian/pool/main"
DEBIAN_13 = {  # trixie: the C and C++ runtimes perf_analyzer was built against
    "g/glibc/libc6_2.41-12_amd64.deb": "6cff801097cd0eb2126b60e533f37afdc78456efacdf2bfae62877f00c795d0b",
    "g/gcc-14/libstdc++6_14.2.0-19_amd64.deb": "ab1fa05837aa7a92aae748fd07a18a35f7d18bb4a71c4724fe2bbf0e32089de0",
    "g/gcc-14/libgcc-s1_14.2.0-19_amd64.deb": "3c71917b490d1a17aed43196a2787a256ecf060526cdb20216a74bedc061b150",
}
TARGETS = {"grpc_vs_http": 0.8, "shm_vs_raw_p50": 1.10}


def perf_analyzer() -> list[str]:
    """The command that runs perf_analyzer, setting it up once (a marker file records success)."""
    libs = TOOL / "debian13" / "usr" / "lib" / "x86_64-linux-gnu"
    binary = TOOL / "wheel" / "perf_analyzer" / "bin" / "perf_analyzer"
    marker = TOOL / ".installed"
    if not marker.exists():
        print(f"setting up {TOOL} (perf_analyzer, Debian 13 runtime libraries) ...", flush=True)
        shutil.rmtree(TOOL, ignore_errors=True)
        (TOOL / "lib").mkdir(parents=True)
        for wheel, platform in WHEELS.items():
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                 "--platform", platform, "--target", TOOL / "wheel", wheel],
                check=True,
            )  # fmt: skip
        (TOOL / "lib" / "libcudart.so").symlink_to(
            TOOL / "wheel" / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12"
        )
        for path, digest in DEBIAN_13.items():
            url = f"{DEBIAN}/{path}"
            data = urllib.request.urlopen(url, timeout=120).read()
            if hashlib.sha256(data).hexdigest() != digest:
                raise SystemExit(f"{url} does not have the pinned sha256 {digest}")
            package = TOOL / url.rsplit("/", 1)[1]
            package.write_bytes(data)
            subprocess.run(["dpkg-deb", "-x", package, TOOL / "debian13"], check=True)
            package.unlink()
        marker.touch()
    return [str(libs / "ld-linux-x86-64.so.2"), "--library-path", f"{libs}:{TOOL / 'lib'}", str(binary)]


def measure(pa: list[str], model: str, url: str, protocol: str, concurrency: int, seconds: float, *extra) -> dict:
    """One perf_analyzer measurement: its CSV row (infer/s, latencies and the server's part, in µs)."""
    with tempfile.NamedTemporaryFile(suffix=".csv") as report:
        command = [
            *pa, "-m", model, "-u", url, "-i", protocol, "--concurrency-range", f"{concurrency}:{concurrency}",
            "-p", str(int(seconds * 1000)), "-s", "50", "-r", "6", "-f", report.name, "--verbose-csv", *extra,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed ({' '.join(command[3:])}):\n{done.stdout[-2000:]}{done.stderr}")
        row = next(csv.DictReader(io.StringIO(Path(report.name).read_text())))
    return {key: float(value) for key, value in row.items()}


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def triton_config(model_name: str, path: Path) -> Path:
    """The model's Triton configuration as edgeloop writes it, for KServe to answer perf_analyzer with."""
    from edgeloop_runtime.protocol import grpc_predict_v2_pb2 as pb
    from google.protobuf import json_format

    with serve_bench.server("edgeloop", path, model_name, Path(tempfile.mkdtemp())) as (http_port, _):
        url = f"http://127.0.0.1:{http_port}/v2/models/{model_name}/config"
        document = json.loads(urllib.request.urlopen(url, timeout=10).read())
    document.pop("instance_group")  # KServe runs one instance; the rest describes the same model
    serialized = json_format.ParseDict({"config": document}, pb.ModelConfigResponse()).SerializeToString()
    file = Path(tempfile.mkdtemp()) / "config.json"
    file.write_text(json.dumps({"json": document, "grpc": base64.b64encode(serialized).decode()}))
    return file


def run_mlp(pa, models, seconds, rounds, workdir) -> dict:
    """HTTP and gRPC at c=1 and 8 on edgeloop and KServe, gRPC streaming on edgeloop; medians of rounds."""
    config = triton_config("mlp", models["mlp"])
    runs: dict[tuple, list[dict]] = {}
    with (
        serve_bench.server("edgeloop", models["mlp"], "mlp", workdir) as edgeloop,
        serve_bench.server("kserve", models["mlp"], "mlp", workdir, (config,)) as kserve,
    ):
        contenders = {"edgeloop": edgeloop, "kserve": kserve}
        for _ in range(rounds):
            for concurrency in (1, 8):
                for contender, (http_port, grpc_port) in contenders.items():
                    for protocol, port, extra in (
                        ("http", http_port, ()),
                        ("grpc", grpc_port, ()),
                        *((("grpc-streaming", grpc_port, ("--streaming",)),) if contender == "edgeloop" else ()),
                    ):
                        print(f"mlp: {contender} {protocol} c={concurrency} ...", flush=True)
                        result = measure(pa, "mlp", f"127.0.0.1:{port}", protocol.split("-")[0], concurrency,
                                         seconds, *extra)  # fmt: skip
                        runs.setdefault((contender, protocol, concurrency), []).append(result)
    return {key: median_of(values) for key, values in runs.items()}


def run_shared_memory(pa, models, seconds, rounds, workdir) -> dict:
    """squeezenet over system shared memory at c=1, HTTP and gRPC, against raw onnxruntime run()."""
    path = models["squeezenet"]
    input_name, x = serve_bench.sample(path)
    _, make = serve_bench.raw_calls(path, input_name, x)
    runs: dict[tuple, list[dict]] = {}
    shm = ("--shared-memory-dir", "/dev/shm")
    with serve_bench.server("edgeloop", path, "squeezenet", workdir, shm) as (http_port, grpc_port):
        for _ in range(rounds):
            raw = serve_bench.measure_raw(make, 1, seconds, 10_000)
            runs.setdefault(("onnxruntime", "run()", 1), []).append(
                {"Inferences/Second": raw.rps, "p50 latency": raw.percentile(50) * 1000}
            )
            for protocol, port in (("http", http_port), ("grpc", grpc_port)):
                print(f"squeezenet: edgeloop {protocol} shared memory c=1 ...", flush=True)
                result = measure(pa, "squeezenet", f"127.0.0.1:{port}", protocol, 1, seconds,
                                 "--shared-memory", "system", "--output-shared-memory-size", str(4096))  # fmt: skip
                runs.setdefault(("edgeloop", f"{protocol}-shm", 1), []).append(result)
    return {key: median_of(values) for key, values in runs.items()}


def report(results: dict) -> str:
    lines = [
        f"{'model':<11}{'contender':<10}{'protocol':<16}{'c':>3}{'infer/s':>10}{'p50 µs':>9}{'avg µs':>9}"
        f"{'server µs':>11}  server part (queue + input + infer + output)",
        "-" * 110,
    ]
    for (model, contender, protocol, concurrency), row in results.items():
        server = [row.get(k) for k in ("Server Queue", "Server Compute Input", "Server Compute Infer",
                                       "Server Compute Output")]  # fmt: skip
        part = " + ".join(f"{v:.0f}" for v in server) if server[0] is not None else ""
        total = f"{sum(server):.0f}" if server[0] is not None else ""
        lines.append(
            f"{model:<11}{contender:<10}{protocol:<16}{concurrency:>3}{row['Inferences/Second']:>10.0f}"
            f"{row['p50 latency']:>9.0f}{row.get('Avg latency', float('nan')):>9.0f}{total:>11}  {part}"
        )
    lines += ["", "targets:"]
    for concurrency in (1, 8):
        http, grpc = (
            results[("mlp", "edgeloop", "http", concurrency)],
            results[("mlp", "edgeloop", "grpc", concurrency)],
        )
        ratio = grpc["Inferences/Second"] / http["Inferences/Second"]
        verdict = "met" if ratio >= TARGETS["grpc_vs_http"] else "MISSED"
        lines.append(
            f"  mlp c={concurrency}: edgeloop gRPC = {ratio:.2f}x edgeloop HTTP infer/s (target >= 0.8x): {verdict}"
        )
        kserve = results[("mlp", "kserve", "grpc", concurrency)]
        ratio = grpc["Inferences/Second"] / kserve["Inferences/Second"]
        lines.append(f"  mlp c={concurrency}: edgeloop gRPC = {ratio:.2f}x KServe gRPC infer/s (target > 1x): "
                     f"{'met' if ratio > 1 else 'MISSED'}")  # fmt: skip
        kserve = results[("mlp", "kserve", "http", concurrency)]
        ratio = http["Inferences/Second"] / kserve["Inferences/Second"]
        lines.append(f"  mlp c={concurrency}: edgeloop HTTP = {ratio:.2f}x KServe HTTP infer/s")
    raw = results[("squeezenet", "onnxruntime", "run()", 1)]
    for protocol in ("http", "grpc"):
        ratio = results[("squeezenet", "edgeloop", f"{protocol}-shm", 1)]["p50 latency"] / raw["p50 latency"]
        verdict = "met" if ratio <= TARGETS["shm_vs_raw_p50"] else "MISSED"
        lines.append(f"  squeezenet c=1 {protocol} shared memory: p50 = {ratio:.2f}x raw run() p50 (target <= 1.10x): "
                     f"{verdict}")  # fmt: skip
    inconsistent = [
        f"{key}" for key, row in results.items()
        if "Server Queue" in row and row["Server Queue"] + row["Server Compute Input"] + row["Server Compute Infer"]
        + row["Server Compute Output"] > row["Avg latency"]
    ]  # fmt: skip
    lines.append(f"  server-side breakdown within client latency: {inconsistent or 'yes'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="perf_analyzer's window (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per figure (default %(default)s)")
    args = parser.parse_args()
    pa = perf_analyzer()
    models = serve_bench.build_models(serve_bench.VENVS / "models")
    with tempfile.TemporaryDirectory(prefix="bench-pa-") as workdir:
        results = {
            ("mlp", *key): row for key, row in run_mlp(pa, models, args.seconds, args.rounds, Path(workdir)).items()
        }
        shm = run_shared_memory(pa, models, args.seconds, args.rounds, Path(workdir))
        results |= {("squeezenet", *key): row for key, row in shm.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "perf_analyzer.json").write_text(
        json.dumps([{"key": list(k), **v} for k, v in results.items()], indent=2)
    )
    print(f"\n{os.cpu_count()} CPUs, perf_analyzer 2.60, {serve_bench.THREADS} onnxruntime thread per run\n")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
