"""Build the pinned upstream components from their Go modules, once per pin.

The pin is this module's go.mod/go.sum (see pin.py). Binaries are cached outside the repo under
~/.cache/edgeloop/devcluster/<kubernetes version>-<pin digest>/ and rebuilt only when the pin, the
Go toolchain or this build recipe changes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path(os.environ.get("EDGELOOP_CACHE", Path.home() / ".cache" / "edgeloop")) / "devcluster"

# binary name -> Go package, in build order (the first one warms the shared build cache the most).
COMPONENTS = {
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    "etcd": "./cmd/etcd",
    "kwok": "sigs.k8s.io/kwok/cmd/kwok",
    "helm": "helm.sh/helm/v3/cmd/helm",
}


def _go(*args: str) -> str:
    return subprocess.run(
        ["go", *args], cwd=MODULE_DIR, check=True, capture_output=True, text=True
    ).stdout


def module_versions() -> dict[str, str]:
    out = _go("list", "-m", "-f", "{{.Path}} {{.Version}}", "k8s.io/kubernetes", "helm.sh/helm/v3", "sigs.k8s.io/kwok")
    return dict(line.split() for line in out.splitlines())


def ldflags(versions: dict[str, str]) -> str:
    """Version stamps, as the upstream Makefiles set them, so that `--version` tells the truth."""
    kubernetes = versions["k8s.io/kubernetes"]
    major, minor = kubernetes.removeprefix("v").split(".")[:2]
    build_date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    stamps = {}
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        stamps |= {
            f"{package}.gitVersion": kubernetes,
            f"{package}.gitMajor": major,
            f"{package}.gitMinor": minor,
            f"{package}.gitTreeState": "clean",
            f"{package}.buildDate": build_date,
        }
    stamps["helm.sh/helm/v3/internal/version.version"] = versions["helm.sh/helm/v3"]
    stamps["helm.sh/helm/v3/internal/version.gitTreeState"] = "clean"
    for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        stamps |= {f"{package}.k8sVersionMajor": major, f"{package}.k8sVersionMinor": minor}
    stamps["sigs.k8s.io/kwok/pkg/consts.Version"] = versions["sigs.k8s.io/kwok"].removeprefix("v")
    return "-s -w " + " ".join(f"-X {name}={value}" for name, value in sorted(stamps.items()))


def pin_digest() -> str:
    digest = hashlib.sha256()
    for path in ("go.mod", "go.sum", "cmd/etcd/main.go"):
        digest.update((MODULE_DIR / path).read_bytes())
    digest.update(Path(__file__).read_bytes())  # the recipe: components and ldflags
    digest.update(_go("env", "GOVERSION").encode())
    return digest.hexdigest()[:12]


def bin_dir() -> Path:
    """Where the binaries of the current pin live (they may not be built yet)."""
    kubernetes = module_versions()["k8s.io/kubernetes"]
    return CACHE_ROOT / f"{kubernetes}-{pin_digest()}" / "bin"


def build(force: bool = False) -> Path:
    target = bin_dir()
    if (target / ".complete").exists() and not force:
        return target
    versions = module_versions()
    flags = ldflags(versions)
    staging = target.with_name(f"bin.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    env = {**os.environ, "CGO_ENABLED": "0"}
    print(f"devcluster: building {len(COMPONENTS)} components of Kubernetes {versions['k8s.io/kubernetes']}"
          f" into {target} (the first build takes a while; later ones are cached)", flush=True)
    started = time.monotonic()
    for number, (name, package) in enumerate(COMPONENTS.items(), start=1):
        step = time.monotonic()
        print(f"  [{number}/{len(COMPONENTS)}] {name:<24}", end="", flush=True)
        result = subprocess.run(
            ["go", "build", "-trimpath", "-ldflags", flags, "-o", str(staging / name), package],
            cwd=MODULE_DIR, env=env, capture_output=True, text=True,
        )
        if result.returncode != 0:
            print("FAILED", flush=True)
            sys.stderr.write(result.stderr)
            raise SystemExit(f"devcluster: building {name} failed")
        print(f"{time.monotonic() - step:6.0f} s", flush=True)
    (staging / ".complete").write_text(json.dumps(versions, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    print(f"devcluster: built in {time.monotonic() - started:.0f} s", flush=True)
    return target
