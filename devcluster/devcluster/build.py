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

# kwok and CoreDNS have modules of their own: they need other client libraries than the pinned release.
KWOK_MODULE_DIR = MODULE_DIR / "kwok"
COREDNS_MODULE_DIR = MODULE_DIR / "coredns"
# binary name -> (module directory, Go package), in build order (the first warms the build cache most).
COMPONENTS = {
    "kube-apiserver": (MODULE_DIR, "k8s.io/kubernetes/cmd/kube-apiserver"),
    "kube-controller-manager": (MODULE_DIR, "k8s.io/kubernetes/cmd/kube-controller-manager"),
    "kube-scheduler": (MODULE_DIR, "k8s.io/kubernetes/cmd/kube-scheduler"),
    "kubectl": (MODULE_DIR, "k8s.io/kubernetes/cmd/kubectl"),
    "kubelet": (MODULE_DIR, "k8s.io/kubernetes/cmd/kubelet"),
    "kube-proxy": (MODULE_DIR, "k8s.io/kubernetes/cmd/kube-proxy"),
    "etcd": (MODULE_DIR, "./cmd/etcd"),
    "helm": (MODULE_DIR, "helm.sh/helm/v3/cmd/helm"),
    "kwok": (KWOK_MODULE_DIR, "sigs.k8s.io/kwok/cmd/kwok"),
    "kwok-default-stages": (KWOK_MODULE_DIR, "./cmd/kwok-default-stages"),
    "coredns": (COREDNS_MODULE_DIR, "."),
}
PIN_FILES = [
    "go.mod", "go.sum", "tools.go", "cmd/etcd/main.go",
    "kwok/go.mod", "kwok/go.sum", "kwok/cmd/kwok-default-stages/main.go",
    "coredns/go.mod", "coredns/go.sum", "coredns/main.go",
]
# kwok's lifecycle stages, written beside the binaries by `kwok-default-stages`.
KWOK_STAGES = "kwok-stages.yaml"


def _go(*args: str, module_dir: Path = MODULE_DIR) -> str:
    return subprocess.run(
        ["go", *args], cwd=module_dir, check=True, capture_output=True, text=True
    ).stdout


def module_versions() -> dict[str, str]:
    listing = _go("list", "-m", "-f", "{{.Path}} {{.Version}}", "k8s.io/kubernetes", "helm.sh/helm/v3")
    listing += _go("list", "-m", "-f", "{{.Path}} {{.Version}}", "sigs.k8s.io/kwok", module_dir=KWOK_MODULE_DIR)
    return dict(line.split() for line in listing.splitlines())


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
    for path in PIN_FILES:
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
    for number, (name, (module_dir, package)) in enumerate(COMPONENTS.items(), start=1):
        step = time.monotonic()
        print(f"  [{number}/{len(COMPONENTS)}] {name:<24}", end="", flush=True)
        result = subprocess.run(
            ["go", "build", "-trimpath", "-ldflags", flags, "-o", str(staging / name), package],
            cwd=module_dir, env=env, capture_output=True, text=True,
        )
        if result.returncode != 0:
            print("FAILED", flush=True)
            sys.stderr.write(result.stderr)
            shutil.rmtree(staging, ignore_errors=True)
            raise SystemExit(f"devcluster: building {name} failed")
        print(f"{time.monotonic() - step:6.0f} s", flush=True)
    with open(staging / KWOK_STAGES, "w") as stages:
        subprocess.run([staging / "kwok-default-stages"], stdout=stages, check=True)
    (staging / ".complete").write_text(json.dumps(versions, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    print(f"devcluster: built in {time.monotonic() - started:.0f} s", flush=True)
    return target
