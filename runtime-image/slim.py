"""Slims the runtime's virtualenv in the image's build stage (runs once there; not part of the package).

    python3 slim.py /opt/edgeloop

- removes what the runtime never imports: packages' tests and tools, onnx's test models, ONNX Runtime's
  optimisation tools and its C API library (the Python binding carries its own copy), LiteRT's WebGPU
  accelerator, NPU compiler plugins and model tools;
- strips the debug information some wheels ship in their shared objects (uvloop's is 13 MB; only files with
  debug sections are touched: stripping a library that auditwheel patched breaks it);
- stores identical files once, as hard links (onnxruntime-openvino ships libopenvino three times).
The smoke run of every image (images/build.py) serves a model after this, so a removal that breaks serving
fails the build.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Globs under site-packages, with why they can go.
REMOVE = {
    "**/tests": "packages' own tests",
    "onnx/backend/test/data": "onnx's test models",
    "numpy/f2py": "numpy's Fortran wrapper generator",
    "numpy/_core/include": "numpy's C headers",
    "onnxruntime/transformers": "ONNX Runtime's model optimisation tools",
    "onnxruntime/quantization": "ONNX Runtime's quantisation tools",
    "onnxruntime/tools": "ONNX Runtime's conversion tools",
    "ai_edge_litert/libLiteRtWebGpuAccelerator.so": "LiteRT's WebGPU accelerator (LiteRT serves on CPU here)",
    "ai_edge_litert/tools": "LiteRT's model tools",
    "ai_edge_litert/aot": "LiteRT's ahead-of-time compilation",
    "ai_edge_litert/vendors": "NPU vendors' compiler plugins for LiteRT",
}
# Removed when no installed package but these requires it (onnx does require ml_dtypes).
UNUSED_DEPENDENCIES = {"ml_dtypes": ("ai-edge-litert",)}
# ONNX Runtime's C API library: the Python binding does not link it (its own copy is inside), nor do the CPU and
# OpenVINO providers; removed only when no file in the venv needs it.
C_API = "onnxruntime/capi/libonnxruntime.so*"


def required_by(site: Path, package: str) -> set[str]:
    """The installed distributions whose metadata requires `package` (not only as an extra)."""
    wanted = package.replace("_", "-").lower()
    users = set()
    for metadata in site.glob("*.dist-info/METADATA"):
        for line in metadata.read_text(errors="replace").splitlines():
            match = re.match(r"Requires-Dist:\s*([A-Za-z0-9._-]+)", line)
            if match and "extra ==" not in line and match.group(1).replace("_", "-").lower() == wanted:
                users.add(metadata.parent.name.split("-")[0].replace("_", "-").lower())
    return users


def is_elf(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == b"\x7fELF"


def has_debug_info(path: Path) -> bool:
    result = subprocess.run(["readelf", "-S", str(path)], capture_output=True, text=True, check=False)
    return ".debug_info" in result.stdout


def needed(path: Path) -> set[str]:
    result = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=False)
    return {line.split("[", 1)[1].rstrip("]") for line in result.stdout.splitlines() if "(NEEDED)" in line}


def main(venv: Path) -> int:
    [site] = venv.glob("lib/python3*/site-packages")
    before = size(venv)
    for pattern, why in REMOVE.items():
        for path in site.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            print(f"slim: removed {path.relative_to(site)} ({why})")
    for package, only_for in UNUSED_DEPENDENCIES.items():
        users = required_by(site, package)
        if users and users <= set(only_for) and (site / package).exists():
            shutil.rmtree(site / package)
            print(f"slim: removed {package} (required by {', '.join(sorted(users))} only, which never imports it)")
    elves = [p for p in venv.rglob("*") if p.is_file() and not p.is_symlink() and ".so" in p.name and is_elf(p)]
    wanted = set().union(*(needed(p) for p in elves)) if elves else set()
    for path in site.glob(C_API):
        if path.name not in wanted:
            path.unlink()
            elves.remove(path)
            print(f"slim: removed {path.relative_to(site)} (no file needs it)")
    debug = [path for path in elves if has_debug_info(path)]
    for path in debug:
        subprocess.run(["strip", "--strip-debug", str(path)], check=True)
    linked = 0
    seen: dict[str, Path] = {}
    for path in sorted(p for p in venv.rglob("*") if p.is_file() and not p.is_symlink()):
        if path.stat().st_size < 65536:
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            path.unlink()
            path.hardlink_to(seen[digest])
            linked += 1
        else:
            seen[digest] = path
    print(f"slim: {len(debug)} shared objects stripped of debug information, {linked} duplicate file(s) linked; "
          f"{before / 1e6:.1f} MB -> {size(venv) / 1e6:.1f} MB")  # fmt: skip
    return 0


def size(root: Path) -> int:
    inodes = {p.stat().st_ino: p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    return sum(inodes.values())


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
