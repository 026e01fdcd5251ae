"""bench/serve: edgeloop vs KServe's ModelServer vs MLServer vs raw onnxruntime, in one run, on one machine.

    .venv/bin/python bench/serve/run.py [--seconds 5] [--models mlp,mlp-tflite,squeezenet,resnet50]

Sets itself up: KServe and MLServer get their own venvs under bench/.venvs/ (their pins conflict), the
digits MLP is trained there too, and written as a .tflite file with the same weights (mlp-tflite: edgeloop
with LiteRT against raw LiteRT invoke()). Every contender serves the same ONNX files with onnxruntime on CPU
with one intra-op thread per run, over the Open Inference Protocol v2 REST API; a closed-loop client
(loadgen.py) drives each at concurrency 1 and 8. Prints req/s, p50, p99 and the ratios; writes JSON
to bench/results/serve.json.

Thread budget: edgeloop and raw onnxruntime get the same number of compute threads, one per core
(--budget): edgeloop runs that many model instances of one intra-op thread; raw onnxruntime runs at most
that many callers at once on one session (more callers than cores only take turns). KServe and MLServer
run their single-process settings, one compute thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import uvloop

sys.path.insert(0, str(Path(__file__).parent))
import loadgen

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VENVS = ROOT / "bench" / ".venvs"
RESULTS = ROOT / "bench" / "results"
PEER_PACKAGES = {
    "kserve": ["kserve==0.21.0", "onnxruntime", "numpy"],
    "mlserver": ["mlserver==1.7.1", "onnxruntime", "numpy"],
    "tools": ["scikit-learn", "skl2onnx", "onnxruntime"],
}
ONNX_LIGHT_MODELS = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
THREADS = 1  # onnxruntime intra-op threads per run, the same for every contender
BUDGET = os.cpu_count() or 1  # compute threads for edgeloop (instances) and raw onnxruntime (callers)
CONCURRENCY = (1, 8)
# Per model: the largest request count per measurement (resnet50 is slow on one thread).
MAX_REQUESTS = {"mlp": 50_000, "mlp-tflite": 50_000, "squeezenet": 2_000, "resnet50": 200}
RAW = ("onnxruntime", "litert")  # the libraries called in-process, for ONNX and tflite models
ROUNDS = 4  # alternations of raw onnxruntime and edgeloop per measurement


def venv_python(name: str) -> Path:
    """The venv's python, creating and installing the venv once (a marker file records success)."""
    venv = VENVS / name
    marker = venv / ".installed"
    if not marker.exists():
        print(f"setting up {venv} ({' '.join(PEER_PACKAGES[name])}) ...", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([venv / "bin" / "pip", "install", "-q", *PEER_PACKAGES[name]], check=True)
        marker.touch()
    return venv / "bin" / "python"


def build_models(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    models = {"mlp": directory / "mlp.onnx", "mlp-tflite": directory / "mlp.tflite"}
    if not models["mlp"].exists():
        subprocess.run([venv_python("tools"), HERE / "build_mlp.py", models["mlp"]], check=True)
    if not models["mlp-tflite"].exists():
        models["mlp-tflite"].write_bytes(tflite_like(models["mlp"]))
    for name in ("squeezenet", "resnet50"):
        models[name] = directory / f"{name}.onnx"
        if not models[name].exists():
            shutil.copy(ONNX_LIGHT_MODELS / f"light_{name}.onnx", models[name])
    return models


def tflite_like(onnx_mlp: Path) -> bytes:
    """The digits MLP as a .tflite file with the same weights (skl2onnx names them coefficient*, intercepts*)."""
    from edgeloop_runtime.backends.tflite_mlp import mlp

    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(onnx_mlp).graph.initializer}
    count = sum(name.startswith("coefficient") for name in weights)
    suffixes = [""] + [str(i) for i in range(1, count)]
    layers = [(weights[f"coefficient{s}"], weights[f"intercepts{s}"].ravel()) for s in suffixes]
    return mlp(layers, softmax=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()[-3000:]}")


@contextmanager
def server(contender: str, model: Path, name: str, workdir: Path, extra: tuple = ()):
    """Starts one contender serving `model` as `name` (with `extra` arguments); yields its HTTP and gRPC ports."""
    http_port, grpc_port = free_port(), free_port()
    env = dict(os.environ)
    if contender == "edgeloop":
        command = [
            sys.executable, "-m", "edgeloop_runtime.cli", "serve", "--model-path", str(model), "--model-name", name,
            "--format", "tflite" if model.suffix == ".tflite" else "onnx",
            "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            "--threads", str(THREADS), "--model-instances", str(BUDGET // THREADS), "--log-level", "WARNING", *extra,
        ]  # fmt: skip
    elif contender == "kserve":
        command = [venv_python("kserve"), HERE / "kserve_server.py", model, name, http_port, grpc_port, THREADS, *extra]
    elif contender == "mlserver":
        root = workdir / f"mlserver-{name}"
        (root / name).mkdir(parents=True, exist_ok=True)
        settings = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": free_port(), "parallel_workers": 0}
        (root / "settings.json").write_text(json.dumps(settings))
        model_settings = {
            "name": name,
            "implementation": "mlserver_runtime.OnnxRuntime",
            "parameters": {"uri": str(model), "extra": {"threads": THREADS}},
        }
        (root / name / "model-settings.json").write_text(json.dumps(model_settings))
        env["PYTHONPATH"] = str(HERE)
        command = [venv_python("mlserver").parent / "mlserver", "start", root]
    else:
        raise ValueError(contender)
    log = workdir / f"{contender}-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(http_port, proc, log)
        yield http_port, grpc_port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sample(model: Path) -> tuple[str, np.ndarray]:
    """The model's single input name and a batch-1 input for it."""
    if model.suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        (detail,) = Interpreter(model_path=str(model)).get_input_details()
        name, shape = detail["name"], [int(d) for d in detail["shape"]]
    else:
        (node,) = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()
        name, shape = node.name, [d if isinstance(d, int) else 1 for d in node.shape]
    return name, np.random.default_rng(0).random(shape, dtype=np.float32)


def request_body(contender: str, model_name: str, input_name: str, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """JSON for the MLP (every contender's common ground); the binary extension for images where supported."""
    tensor = {"name": input_name, "datatype": "FP32", "shape": list(x.shape)}
    binary = not model_name.startswith("mlp") and contender in ("edgeloop", "kserve")
    if not binary:
        body = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
        return body, {"Content-Type": "application/json"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return header + x.tobytes(), headers


def raw_calls(model: Path, input_name: str, x: np.ndarray) -> tuple[str, Callable[[], Callable[[], object]]]:
    """The library called in-process, and a maker of per-thread calls that run one inference: onnxruntime threads
    share one session; LiteRT's interpreter is not thread-safe, so each thread gets one (as edgeloop's do)."""
    if model.suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        def make() -> Callable[[], object]:
            interpreter = Interpreter(model_path=str(model), num_threads=THREADS)
            interpreter.allocate_tensors()
            index = interpreter.get_input_details()[0]["index"]
            outputs = [d["index"] for d in interpreter.get_output_details()]

            def call():
                interpreter.set_tensor(index, x)
                interpreter.invoke()
                return [interpreter.get_tensor(i) for i in outputs]

            return call

        return "litert", make
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feeds = {input_name: x}
    return "onnxruntime", lambda: lambda: session.run(None, feeds)


def measure_raw(make, concurrency: int, seconds: float, max_requests: int) -> loadgen.Result:
    """The limit: the library called in-process by up to BUDGET threads; the result is reported at
    `concurrency` (the requests a server would have in flight)."""
    latencies: list[float] = []
    count = [0]
    deadline = time.perf_counter() + seconds

    def loop():
        call = make()
        for _ in range(3):
            call()
        while time.perf_counter() < deadline and count[0] < max_requests:
            count[0] += 1
            start = time.perf_counter()
            call()
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    threads = [threading.Thread(target=loop) for _ in range(min(concurrency, BUDGET))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return loadgen.Result(concurrency, len(latencies), 0, time.perf_counter() - started, np.array(latencies))


def measure_http(port: int, request: bytes, concurrency: int, seconds: float, max_requests: int, warmup: int):
    run = loadgen.run(
        "127.0.0.1", port, request, concurrency=concurrency, seconds=seconds, max_requests=max_requests, warmup=warmup
    )
    return uvloop.run(run)


def merge(parts: list[loadgen.Result]) -> loadgen.Result:
    return loadgen.Result(
        parts[0].concurrency,
        sum(p.requests for p in parts),
        sum(p.errors for p in parts),
        sum(p.seconds for p in parts),
        np.concatenate([p.latencies for p in parts]),
    )


def row(model: str, contender: str, result: loadgen.Result) -> dict:
    return {
        "model": model, "contender": contender, "concurrency": result.concurrency,
        "requests": result.requests, "errors": result.errors, "rps": result.rps,
        "p50_ms": result.percentile(50), "p99_ms": result.percentile(99),
    }  # fmt: skip


def run(models: dict[str, Path], contenders: list[str], seconds: float, workdir: Path) -> list[dict]:
    rows = []
    for name, path in models.items():
        input_name, x = sample(path)
        raw_name, make = raw_calls(path, input_name, x)
        limit = MAX_REQUESTS[name]
        # KServe and MLServer serve the ONNX files (their onnxruntime runtimes); the tflite MLP is edgeloop's.
        servers = [c for c in contenders if c not in RAW and (c == "edgeloop" or path.suffix == ".onnx")]
        for contender in servers:
            print(f"{name}: {contender} ...", flush=True)
            with server(contender, path, name, workdir) as (port, _), paired_server(name, models, workdir) as paired:
                body, headers = request_body(contender, name, input_name, x)
                request = loadgen.build_request("127.0.0.1", port, f"/v2/models/{name}/infer", body, headers)
                for c in CONCURRENCY:
                    if contender != "edgeloop" or "onnxruntime" not in contenders:
                        rows.append(row(name, contender, measure_http(port, request, c, seconds, limit, 20)))
                        continue
                    # The raw library and edgeloop (and the ONNX twin of a tflite model) alternate in short
                    # rounds, so that all meet the same load from whatever else runs on the machine; the rounds
                    # are pooled.
                    raw, own, twin = [], [], []
                    for i in range(ROUNDS):
                        raw.append(measure_raw(make, c, seconds / ROUNDS, limit // ROUNDS))
                        warmup = 20 if i == 0 else 0
                        own.append(measure_http(port, request, c, seconds / ROUNDS, limit // ROUNDS, warmup))
                        if paired:
                            twin.append(measure_http(*paired, c, seconds / ROUNDS, limit // ROUNDS, warmup))
                    rows += [row(name, "edgeloop", merge(own)), row(name, raw_name, merge(raw))]
                    if twin:
                        rows.append(row(name, TWIN, merge(twin)))
    return rows


TWINS = {"mlp-tflite": "mlp"}  # a tflite model and the ONNX model with its weights
TWIN = "onnx twin"  # edgeloop serving the ONNX twin, measured in the same rounds


@contextmanager
def paired_server(name: str, models: dict[str, Path], workdir: Path):
    """For a tflite model with an ONNX twin: edgeloop serving the twin, as (port, request); else None."""
    twin = TWINS.get(name)
    if twin is None:
        yield None
        return
    path = models.get(twin) or build_models(VENVS / "models")[twin]
    input_name, x = sample(path)
    with server("edgeloop", path, twin, workdir) as (port, _):
        body, headers = request_body("edgeloop", twin, input_name, x)
        yield port, loadgen.build_request("127.0.0.1", port, f"/v2/models/{twin}/infer", body, headers)


def find(rows, model, contender, concurrency):
    return next(
        (r for r in rows if (r["model"], r["contender"], r["concurrency"]) == (model, contender, concurrency)), None
    )


def report(rows: list[dict]) -> str:
    lines = [
        f"{'model':<11}{'c':>3}  {'contender':<12}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'err':>5}   edgeloop vs this",
        "-" * 86,
    ]
    for row in rows:
        own = find(rows, row["model"], "edgeloop", row["concurrency"])
        if row["contender"] == "edgeloop":
            versus = ""
        elif row["contender"] == TWIN:
            versus = f"p50 {own['p50_ms'] / row['p50_ms']:.2f}x of the twin's, req/s {own['rps'] / row['rps']:.2f}x"
        elif row["contender"] in RAW:
            versus = f"p50 {own['p50_ms'] / row['p50_ms']:.2f}x of raw, req/s {own['rps'] / row['rps']:.2f}x"
        else:
            versus = f"req/s {own['rps'] / row['rps']:.2f}x, p50 {row['p50_ms'] / own['p50_ms']:.2f}x lower"
        lines.append(
            f"{row['model']:<11}{row['concurrency']:>3}  {row['contender']:<12}{row['rps']:>9.0f}"
            f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['errors']:>5}   {versus}"
        )
    lines += ["", "targets:"]
    for c in CONCURRENCY:
        own = find(rows, "mlp", "edgeloop", c)
        for peer in ("kserve", "mlserver"):
            other = find(rows, "mlp", peer, c)
            if own and other:
                ratio = own["rps"] / other["rps"]
                verdict = "met" if ratio >= 2.5 else "MISSED"
                lines.append(f"  mlp c={c}: edgeloop req/s = {ratio:.2f}x {peer} (target >= 2.5x): {verdict}")
    own, raw = find(rows, "squeezenet", "edgeloop", 1), find(rows, "squeezenet", "onnxruntime", 1)
    if own and raw:
        ratio = own["p50_ms"] / raw["p50_ms"]
        verdict = "met" if ratio <= 1.25 else "MISSED"
        lines.append(f"  squeezenet c=1: edgeloop p50 = {ratio:.2f}x raw onnxruntime (target <= 1.25x): {verdict}")
    for c in CONCURRENCY:
        onnx_mlp, tflite_mlp = find(rows, "mlp-tflite", TWIN, c), find(rows, "mlp-tflite", "edgeloop", c)
        if onnx_mlp and tflite_mlp:
            p50, rps = tflite_mlp["p50_ms"] / onnx_mlp["p50_ms"], tflite_mlp["rps"] / onnx_mlp["rps"]
            verdict = "met" if p50 <= 1.1 and rps >= 1 / 1.1 else "MISSED"
            lines.append(f"  mlp-tflite c={c}: edgeloop's tflite MLP p50 = {p50:.2f}x, req/s = {rps:.2f}x its onnx "
                         f"MLP's (target within 1.1x): {verdict}")  # fmt: skip
    for model in ("squeezenet", "resnet50"):
        own, raw = find(rows, model, "edgeloop", 8), find(rows, model, "onnxruntime", 8)
        if own and raw:
            ratio = own["rps"] / raw["rps"]
            verdict = "met" if ratio >= 0.9 else "MISSED"
            lines.append(f"  {model} c=8: edgeloop req/s = {ratio:.2f}x raw onnxruntime (target >= 0.9x): {verdict}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (default %(default)s)")
    parser.add_argument("--models", default="mlp,mlp-tflite,squeezenet,resnet50")
    parser.add_argument("--contenders", default="edgeloop,kserve,mlserver,onnxruntime")
    args = parser.parse_args()
    contenders = args.contenders.split(",")
    if "edgeloop" not in contenders:
        parser.error("edgeloop is the subject: keep it among --contenders")
    models = {k: v for k, v in build_models(VENVS / "models").items() if k in args.models.split(",")}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir:
        rows = run(models, contenders, args.seconds, Path(workdir))
    text = report(rows)
    print(
        f"\n{os.cpu_count()} CPUs, onnxruntime {ort.__version__}, {THREADS} intra-op thread(s) per run everywhere; "
        f"thread budget {BUDGET}: edgeloop {BUDGET // THREADS} model instance(s), raw onnxruntime up to {BUDGET} "
        "caller(s) on one session; KServe and MLServer one process, one compute thread\n"
    )
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
