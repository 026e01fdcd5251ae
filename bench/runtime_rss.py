"""The runtime's memory in its image: RSS of `edgeloop-runtime serve` with the digits model, idle after its
warm-up and after serving, as ONNX and as tflite, plain and with TLS (as the operator renders it).

    sudo .venv/bin/python bench/runtime_rss.py [--image runtime] [--requests 300] [--instances 2]

Runs the image `make images` built (from its buildah storage, ${EDGELOOP_CACHE:-~/.cache/edgeloop}/images)
in a chroot of its files, as its user, with its environment, on loopback; needs root. Target (issue 14):
idle RSS ≤ 80 MB with the digits model loaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "images"))
sys.path.insert(0, str(ROOT / "runtime-image"))

import build  # noqa: E402  (images/build.py: the storage and the image's config)

TARGET_MB = 80.0
PORT = 18480


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} has no VmRSS")


def ready(context) -> bool:
    try:
        with urllib.request.urlopen(
            f"{scheme(context)}://127.0.0.1:{PORT}/v2/health/ready", timeout=1, context=context
        ) as response:
            return response.status == 200
    except OSError:
        return False


def scheme(context) -> str:
    return "http" if context is None else "https"


def serve_and_measure(mount: Path, config: dict, model: str, fmt: str, tls: bool, args) -> tuple[float, float]:
    import ssl

    command = [
        "/opt/edgeloop/bin/edgeloop-runtime",
        "serve",
        "--model-path",
        f"/tmp/rss/{model}",
        "--format",
        fmt,
        "--model-name",
        "digits",
        "--host",
        "127.0.0.1",
        "--http-port",
        str(PORT),
        "--grpc-port",
        str(PORT + 1),
        "--model-instances",
        str(args.instances),
        "--cache",
        "/tmp/rss",
    ]
    context = None
    if tls:
        command += ["--tls-cert", "/tmp/rss/tls.crt", "--tls-key", "/tmp/rss/tls.key"]
        context = ssl.create_default_context(cafile=str(mount / "tmp/rss/tls.crt"))
        context.check_hostname = False
    environment = dict(item.split("=", 1) for item in config.get("Env") or [])
    process = subprocess.Popen(
        [shutil.which("chroot"), f"--userspec={config.get('User') or '0:0'}", str(mount), *command],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready(context):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not become ready: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        time.sleep(2)
        idle = rss_mb(process.pid)
        body = json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.1] * 64}]}
        ).encode()
        for _ in range(args.requests):
            request = urllib.request.Request(f"{scheme(context)}://127.0.0.1:{PORT}/v2/models/digits/infer", body)
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                response.read()
        return idle, rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="runtime", help="the flavour (images/build.py's name)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--instances", type=int, default=2)
    args = parser.parse_args()
    built = json.loads((build.CACHE / "images.json").read_text())["images"]
    ref = next(image["ref"] for image in built if image["name"] == args.image)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, str(ROOT / "images" / "smoke_model.py"), "prepare", scratch], check=True)
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                f"{scratch}/tls.key",
                "-out",
                f"{scratch}/tls.crt",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ],
            check=True,
            capture_output=True,
        )
        container = build.buildah("from", "--pull=never", ref, capture=True)
        mount = Path(build.buildah("mount", container, capture=True))
        try:
            shutil.copytree(scratch, mount / "tmp" / "rss")
            (mount / "tmp" / "rss").chmod(0o755)
            for path in (mount / "tmp" / "rss").iterdir():
                path.chmod(0o644)
            # ONNX Runtime reads /proc/cpuinfo for the CPU's features, as it does in a pod.
            (mount / "proc").mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "proc", "proc", str(mount / "proc")], check=True)
            config = build.image_config(ref)
            print(f"{ref}, {args.instances} instance(s), {args.requests} requests; target idle ≤ {TARGET_MB:g} MB")
            print(f"{'model':<14}{'TLS':<6}{'idle MB':>9}{'served MB':>11}  target")
            for model, fmt in (("digits.onnx", "onnx"), ("digits.tflite", "tflite")):
                for tls in (False, True):
                    idle, served = serve_and_measure(mount, config, model, fmt, tls, args)
                    verdict = "met" if idle <= TARGET_MB else f"missed by {idle - TARGET_MB:.1f} MB"
                    print(f"{model:<14}{'on' if tls else 'off':<6}{idle:>9.1f}{served:>11.1f}  {verdict}")
        finally:
            subprocess.run(["umount", str(mount / "proc")], check=False, capture_output=True)
            build.buildah("rm", container, capture=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
