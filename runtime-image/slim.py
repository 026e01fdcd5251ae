"""Slims the runtime image in its build stage (runs there only; not part of the package).

    python3 slim.py venv /opt/edgeloop            the virtualenv, in place
    python3 slim.py rootfs /opt/edgeloop /rootfs  the final image's whole file tree (it is FROM scratch)

venv:
- removes what the runtime never imports: packages' tests and tools, onnx's test models, ONNX Runtime's
  optimisation tools and its C API library (the Python binding carries its own copy), LiteRT's WebGPU
  accelerator, NPU compiler plugins and model tools;
- strips the debug information some wheels ship in their shared objects (uvloop's is 13 MB; only files with
  debug sections are touched: stripping a library that auditwheel patched breaks it);
- stores identical files once, as hard links (onnxruntime-openvino ships libopenvino three times).
rootfs: Debian's Python (its binary, its standard library less what a server never imports: tests, IDLE,
tkinter, curses, dbm, sqlite3, ...), the virtualenv, the shared libraries all of their ELF files need (the
closure of their NEEDED entries), the CA bundle, and the few files of /etc a process looks up. No shell, no
package manager: Debian's base and apt are 100 MB the runtime never runs.
The smoke run of every image (images/build.py) serves a model after this, so a removal that breaks serving
fails the build.
"""

from __future__ import annotations

import hashlib
import os
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


def slim_venv(venv: Path) -> int:
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


# The standard library's parts a server never imports (and the libraries only they would pull in).
STDLIB_LEFT_OUT = ["test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "sqlite3",
                   "curses", "dbm", "lib-dynload/_sqlite3.*", "lib-dynload/_curses*", "lib-dynload/readline.*",
                   "lib-dynload/_dbm.*", "lib-dynload/_gdbm.*", "lib-dynload/_tkinter.*"]  # fmt: skip
# Files of /etc a process looks up: Debian's Python configuration, name service order, services and protocols,
# the CA bundle.
ETC = ["/etc/python3.11", "/etc/nsswitch.conf", "/etc/services", "/etc/protocols", "/etc/ssl/certs/ca-certificates.crt"]
PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nedgeloop:x:65532:65532:edgeloop:/tmp:/sbin/nologin\n"
GROUP = "root:x:0:\nedgeloop:x:65532:\n"


class Tree:
    """Copies files from / into a new root, as the kernel would find them: symbolic links on the way (usrmerge's
    /lib, a library's soname) are made there too."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def place(self, path: Path) -> Path:
        """Copies `path` (absolute) into the tree; returns the real file it was."""
        current = Path("/")
        parts = path.parts[1:]
        for index, part in enumerate(parts):
            current = current / part
            if current.is_symlink():
                link = os.readlink(current)
                target = self.root / current.relative_to("/")
                if not target.is_symlink():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(link)
                return self.place(Path(os.path.normpath(current.parent / link)).joinpath(*parts[index + 1 :]))
        target = self.root / current.relative_to("/")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            if current.is_dir():
                shutil.copytree(current, target, symlinks=True)
            else:
                shutil.copy2(current, target)
        return current


def interpreter(path: Path) -> Path | None:
    result = subprocess.run(["readelf", "-l", str(path)], capture_output=True, text=True, check=False)
    match = re.search(r"Requesting program interpreter: (\S+)\]", result.stdout)
    return Path(match.group(1)) if match else None


def search_path(path: Path) -> list[Path]:
    """Where the dynamic linker looks for the libraries `path` needs: its RUNPATH ($ORIGIN too), then the system's."""
    result = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=False)
    found = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", result.stdout)
    runpath = [Path(entry.replace("$ORIGIN", str(path.parent))) for line in found for entry in line.split(":")]
    triplet = next(Path("/usr/lib").glob("*-linux-gnu")).name
    return [*runpath, Path(f"/lib/{triplet}"), Path(f"/usr/lib/{triplet}"), Path("/lib"), Path("/usr/lib")]


def rootfs(venv: Path, root: Path) -> int:
    tree = Tree(root)
    python = Path(os.path.realpath("/usr/bin/python3"))
    tree.place(python)
    (root / "usr/bin/python3").symlink_to(python.name)
    stdlib = Path(f"/usr/lib/{python.name}")
    shutil.copytree(stdlib, root / stdlib.relative_to("/"), symlinks=True,
                    ignore=lambda directory, names: [n for n in names if any(
                        Path(directory, n).match(str(stdlib / pattern)) for pattern in STDLIB_LEFT_OUT)])  # fmt: skip
    for path in ETC:
        if Path(path).exists():
            tree.place(Path(path))
    shutil.copytree(venv, root / venv.relative_to("/"), symlinks=True)
    # Every ELF file's libraries, and theirs, until nothing new is needed.
    pending = [python, *(p for base in (root / stdlib.relative_to("/"), root / venv.relative_to("/"))
                         for p in base.rglob("*.so*") if p.is_file() and not p.is_symlink() and is_elf(p))]  # fmt: skip
    done: set[Path] = set()
    missing: list[str] = []
    while pending:
        path = pending.pop()
        if path in done:
            continue
        done.add(path)
        if (loader := interpreter(path)) is not None:
            pending.append(tree.place(loader))
        source = Path("/") / path.relative_to(root) if path.is_relative_to(root) else path
        for name in needed(path):
            for directory in search_path(source):
                candidate = directory / name
                if candidate.exists():
                    inside = root / candidate.relative_to("/")
                    pending.append(
                        inside if inside.exists() and candidate.is_relative_to(venv) else tree.place(candidate)
                    )
                    break
            else:  # a plugin loaded on demand, needing a device's user-space driver (OpenVINO's GPU, NPU)
                missing.append(f"{path.name} needs {name}")
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    (root / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    models = root / "var/lib/edgeloop/models"
    models.mkdir(parents=True)
    os.chown(models, 65532, 65532)
    for line in sorted(set(missing)):
        print(f"slim: not in the image (the smoke run proves serving needs none): {line}")
    print(f"slim: rootfs {root}: {size(root) / 1e6:.1f} MB, {len(done)} ELF files")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["venv"] and len(argv) == 2:
        return slim_venv(Path(argv[1]))
    if argv[:1] == ["rootfs"] and len(argv) == 3:
        return rootfs(Path(argv[1]), Path(argv[2]))
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
