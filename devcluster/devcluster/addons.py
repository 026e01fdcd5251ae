"""Components with a Go module of their own that came after the pin's components (build.py), each built and
cached by the digest of its own module: adding or bumping one does not rebuild the Kubernetes binaries, whose
cache key covers build.py itself.

- local-path-provisioner: k3s's default StorageClass (`local-path`), github.com/rancher/local-path-provisioner,
  pinned in devcluster/local-path/go.mod; about 2 minutes to build on 2 cores.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from devcluster.build import CACHE_ROOT, MODULE_DIR
from devcluster.errors import ClusterError


@dataclass(frozen=True)
class Addon:
    module_dir: Path  # its own go.mod/go.sum (and tools.go, which names the package for `go mod tidy`)
    package: str  # the main package built

    def digest(self) -> str:
        digest = hashlib.sha256()
        for name in ("go.mod", "go.sum", "tools.go"):
            digest.update((self.module_dir / name).read_bytes())
        digest.update(self.package.encode())
        digest.update(subprocess.run(["go", "env", "GOVERSION"], capture_output=True, text=True, check=True).stdout
                      .encode())
        return digest.hexdigest()[:12]


ADDONS = {
    "local-path-provisioner": Addon(MODULE_DIR / "local-path", "github.com/rancher/local-path-provisioner"),
}


def path(name: str) -> Path:
    """Where add-on `name`'s binary of the current pin lives (it may not be built yet)."""
    return CACHE_ROOT / f"{name}-{ADDONS[name].digest()}" / name


def build(name: str, log=print) -> Path:
    """Add-on `name`'s binary, built from its module unless already cached."""
    target = path(name)
    if target.exists():
        return target
    addon = ADDONS[name]
    log(f"devcluster: building {name} from {addon.module_dir} into {target.parent} (once per pin)")
    started = time.monotonic()
    staging = target.with_name(f"{name}.partial-{os.getpid()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(staging), addon.package],
        cwd=addon.module_dir, env={**os.environ, "CGO_ENABLED": "0"}, capture_output=True, text=True,
    )
    if result.returncode != 0:
        staging.unlink(missing_ok=True)
        raise ClusterError(f"building {name} failed:\n{result.stderr}")
    shutil.move(staging, target)  # a rename in one directory: concurrent builds leave one complete binary
    log(f"devcluster: built {name} in {time.monotonic() - started:.0f} s")
    return target
