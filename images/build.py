"""`make images`: build edgeloop's runtime flavours, operator and pause images locally, without a registry or a
Docker engine, as OCI archives that `ctr -n k8s.io images import` loads into a node's containerd.

- base: a Debian bookworm root filesystem made by debootstrap from Debian's packages, slimmed like the
  debian:bookworm-slim image and committed as localhost/edgeloop/debian:bookworm-slim;
- runtime flavours (runtime, runtime-openvino, runtime-federated; runtime-cuda only when asked for, it is
  big), operator: their own Dockerfiles (the recipe registry users build too), run by `buildah bud` with
  --build-arg BASE_IMAGE=<that base> (and the flavour's EXTRAS); the Python dependencies come from PyPI;
- pause: the pinned Kubernetes release's build/pause (pause.c and its Dockerfile), compiled as upstream does.

Archives and images.json go to ${EDGELOOP_CACHE:-~/.cache/edgeloop}/images/. An image is rebuilt only when its
inputs change (see input_digest). Needs root (debootstrap, buildah's storage); see docs/images.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGELOOP_CACHE") or "~/.cache/edgeloop").expanduser() / "images"
INDEX = CACHE / "images.json"

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
BASE_REF = f"localhost/edgeloop/debian:{DEBIAN_SUITE}-slim"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
ARCHES = ("amd64", "arm64")
QEMU = {"amd64": "qemu-x86_64", "arm64": "qemu-aarch64"}  # binfmt_misc entries of qemu-user-static
CROSS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}  # gcc/strip prefixes for pause
CROSS_PACKAGES = {"amd64": ["gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross"],
                  "arm64": ["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"]}  # fmt: skip

# Run inside the debootstrapped tree (by `buildah run`, which provides /proc, /dev and DNS) before the base is
# committed: what makes debian:bookworm-slim slim, and the release's updates and security updates.
BASE_SETUP = f"""
set -eu
rm -f /etc/apt/sources.list
cat > /etc/apt/sources.list.d/debian.sources <<EOF
Types: deb
URIs: {DEBIAN_MIRROR}
Suites: {DEBIAN_SUITE} {DEBIAN_SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {DEBIAN_SECURITY_MIRROR}
Suites: {DEBIAN_SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# dpkg leaves out docs, man pages and translations in every later install too (images built FROM this base).
cat > /etc/dpkg/dpkg.cfg.d/docker <<EOF
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
clean='rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true'
cat > /etc/apt/apt.conf.d/docker-clean <<EOF
DPkg::Post-Invoke {{ "$clean"; }};
APT::Update::Post-Invoke {{ "$clean"; }};
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' > /etc/apt/apt.conf.d/docker-no-languages
echo 'APT::AutoRemove::SuggestsImportant "false";' > /etc/apt/apt.conf.d/docker-autoremove-suggests
printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get upgrade -y -q
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old
find /var/log -type f -delete
find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf /usr/share/groff/* /usr/share/info/* /usr/share/linda/* /usr/share/lintian/overrides/* \\
    /usr/share/locale/* /usr/share/man/*
"""


# The runtime's flavours: the extras of runtime-image/pyproject.toml each one installs (its EXTRAS build arg).
RUNTIMES = {
    "runtime": "cpu,tflite",
    "runtime-openvino": "openvino",
    "runtime-federated": "federated",
    "runtime-cuda": "cuda",
}
ON_REQUEST = ("runtime-cuda",)  # ~1.5 GB of CUDA and cuDNN wheels: `make images-cuda`, not CI
# No aarch64 wheels: onnxruntime-gpu (Jetson needs NVIDIA's own builds) and onnxruntime-openvino (Intel NPUs and
# iGPUs sit beside x86 cores).
ONE_ARCH = {"runtime-cuda": "amd64", "runtime-openvino": "amd64"}

# Commands that must succeed in each built image, run as the image's USER: it starts, finds its modules and, for
# a serving flavour, answers the digits model through its own backend code (images/smoke_model.py; the model
# and the reference answer are mounted at /smoke).
MODEL_CHECK = ("python", "/smoke/smoke_model.py", "check")
OPENVINO_ON = '{"OpenVINOExecutionProvider": {"device_type": "%s"}}'
RUNTIME_USER = "assert os.getuid() == 65532 == os.stat('/var/lib/edgeloop/models').st_uid"
CUDA_PROVIDER_LOADS = """
import ctypes, onnxruntime, pathlib
from edgeloop_runtime.backends.onnxruntime import load_nvidia_libraries
load_nvidia_libraries()
try:
    ctypes.CDLL(str(pathlib.Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"))
except OSError as error:
    assert "libcuda.so.1" in str(error), error
"""
SMOKE = {
    "runtime": (
        ("edgeloop-runtime", "--help"),
        ("python", "-c", f"import os, onnxruntime, numpy, hpack, uvloop, ai_edge_litert.interpreter; {RUNTIME_USER}"),
        (*MODEL_CHECK, "--format", "onnx"),
        (*MODEL_CHECK, "--format", "tflite"),
    ),
    "runtime-openvino": (
        ("edgeloop-runtime", "--help"),
        # The provider is there and runs the model (CPU standing in for an NPU); an NPU that is not there is
        # refused, not silently replaced by the CPU.
        (
            *MODEL_CHECK,
            "--providers",
            "OpenVINOExecutionProvider",
            "--provider-options",
            OPENVINO_ON % "CPU",
            "--tolerance",
            "1e-4",
        ),
        (
            *MODEL_CHECK,
            "--providers",
            "OpenVINOExecutionProvider",
            "--provider-options",
            OPENVINO_ON % "NPU",
            "--refuse",
        ),
    ),
    "runtime-federated": (
        ("edgeloop-runtime", "federated", "--help"),
        ("python", "-c", f"import os, onnx, cryptography, numpy; {RUNTIME_USER}"),
    ),
    "runtime-cuda": (
        ("edgeloop-runtime", "--help"),
        (
            "python",
            "-c",
            "import onnxruntime as o; p = o.get_available_providers(); assert 'CUDAExecutionProvider' in p, p",
        ),
        # CUDA's and cuDNN's libraries (from their wheels, on no library path) load, so the provider's library
        # lacks only the driver's, which the node's nvidia container runtime mounts.
        ("python", "-c", CUDA_PROVIDER_LOADS),
        # No GPU on the build machine: refused, saying so.
        (*MODEL_CHECK, "--providers", "CUDAExecutionProvider", "--refuse", "no NVIDIA device in this container"),
    ),
    "operator": (
        ("edgeloop", "operator", "--help"),
        ("python", "-c", "import os, kopf, kubernetes, edgeloop.operator_main; assert os.getuid() == 65532"),
    ),
    "pause": (("/pause", "-v"),),  # prints the version compiled in and exits
}
NAMES = tuple(SMOKE)
DEFAULT = tuple(name for name in NAMES if name not in ON_REQUEST)


# --- pure helpers -------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped (as Docker reads them)."""
    instructions: list[str] = []
    current = ""
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            instructions.append(current.strip())
        current = ""
    if current.strip():
        instructions.append(current.strip())
    return instructions


def copied_sources(dockerfile_text: str) -> list[str]:
    """The build-context paths the Dockerfile's COPY and ADD read (not those copied from another stage)."""
    sources: list[str] = []
    for instruction in dockerfile_instructions(dockerfile_text):
        keyword, _, rest = instruction.partition(" ")
        if keyword.upper() not in ("COPY", "ADD"):
            continue
        words = shlex.split(rest)
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources.extend(paths[:-1])  # the last one is the destination
    return sources


def from_images(dockerfile_text: str) -> list[str]:
    """The image each stage starts FROM, as written (build args unexpanded)."""
    return [
        instruction.split()[1]
        for instruction in dockerfile_instructions(dockerfile_text)
        if instruction.split()[0].upper() == "FROM"
    ]


def ignored(relative: Path) -> bool:
    # As the .dockerignore files say: bytecode caches are not inputs.
    return "__pycache__" in relative.parts or relative.suffix == ".pyc"


def copied_files(dockerfile: Path, context: Path) -> dict[str, Path]:
    """Every context file the Dockerfile's COPY and ADD read, by its path relative to the context."""
    files: dict[str, Path] = {}
    for source in copied_sources(dockerfile.read_text()):
        path = context / source
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            relative = file.relative_to(context)
            if not ignored(relative):
                files[relative.as_posix()] = file
    return files


def input_digest(dockerfile: Path, files: dict[str, Path], extra: dict[str, str]) -> str:
    """What defines an image: its Dockerfile, the files it copies in (names and contents) and the rest (build
    args, the base image's ID). The image is rebuilt when this changes."""
    digest = hashlib.sha256()
    digest.update(b"Dockerfile " + hashlib.sha256(dockerfile.read_bytes()).hexdigest().encode() + b"\n")
    for key, value in sorted(extra.items()):
        digest.update(f"arg {key}={value}\n".encode())
    for name, path in sorted(files.items()):
        digest.update(f"file {name} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return "sha256:" + digest.hexdigest()


def base_recipe_digest() -> str:
    """What defines the base: the release, the mirror, the variant and the setup script."""
    recipe = json.dumps([DEBIAN_SUITE, DEBIAN_MIRROR, "minbase", BASE_SETUP, DEFAULT_PATH])
    return "sha256:" + hashlib.sha256(recipe.encode()).hexdigest()


def pip_settings(pip_config_list: str) -> dict[str, str]:
    """The network settings of the host's pip, from `pip config list` (index, CA bundle, timeout, proxy): the
    build's pip needs them too, e.g. the CA a TLS-intercepting proxy signs with. Nothing else is passed."""
    wanted = ("index-url", "extra-index-url", "trusted-host", "cert", "timeout", "default-timeout", "proxy")
    settings: dict[str, str] = {}
    for line in pip_config_list.splitlines():
        match = re.fullmatch(r"[^.]*\.([\w-]+)='(.*)'", line.strip())
        if match and match.group(1) in wanted:
            settings[match.group(1)] = match.group(2)  # later lines (environment variables) win
    return settings


def pause_cflags(tag: str, kubernetes_version: str) -> list[str]:
    # Upstream's Makefile: CFLAGS = -Os -Wall -Werror -static -DVERSION=v$(TAG)-$(REV), REV being the release's
    # `git describe`; the module cache has no git history, so the release's version stands in.
    return ["-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{tag}-{kubernetes_version}"]


def tree_bytes(root: Path) -> int:
    """The size of the files in a root filesystem (hard links once), as `du --apparent-size` counts them."""
    seen: set[int] = set()
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            stat = os.lstat(os.path.join(directory, name))
            if stat.st_ino not in seen:
                seen.add(stat.st_ino)
                total += stat.st_size
    return total


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


# --- running things -----------------------------------------------------------------------------------------


def run(*args: str | Path, capture: bool = False, log: Path | None = None, **kwargs) -> str:
    """Runs a command; exits with it (and the end of its log) when it fails."""
    command = [str(arg) for arg in args]
    with open(log, "a") if log else open(os.devnull, "w") as log_file:
        stdout = subprocess.PIPE if capture else (log_file if log else None)
        stderr = subprocess.STDOUT if log else None
        result = subprocess.run(command, check=False, text=True, stdout=stdout, stderr=stderr, **kwargs)
    if result.returncode != 0:
        if log:
            print("".join(log.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        sys.exit(f"images: failed ({result.returncode}): {shlex.join(command)}" + (f"\n  log: {log}" if log else ""))
    return result.stdout.strip() if capture else ""


def storage_options() -> list[str]:
    # A storage of its own under the cache: nothing global (/var/lib/containers) is touched.
    driver = os.environ.get("EDGELOOP_STORAGE_DRIVER", "overlay")
    return ["--root", str(CACHE / "storage"), "--runroot", str(CACHE / "runroot"), "--storage-driver", driver]


def buildah(*args: str | Path, capture: bool = False, log: Path | None = None) -> str:
    return run("buildah", *storage_options(), *args, capture=capture, log=log)


def image_id(ref: str) -> str | None:
    command = ["buildah", *storage_options(), "inspect", "--type", "image", "--format", "{{.FromImageID}}", ref]
    result = subprocess.run(command, check=False, text=True, capture_output=True)
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def ensure_tools() -> None:
    if os.geteuid() != 0:
        sys.exit("images: needs root (debootstrap, and buildah's storage and chroot builds): sudo make images")
    missing = [tool for tool in ("buildah", "debootstrap") if not shutil.which(tool)]
    if missing:
        print(f"images: installing {' '.join(missing)} from Debian's packages", flush=True)
        run("apt-get", "install", "-y", "-q", *missing)


def ensure_emulation(arches: list[str]) -> None:
    """qemu-user-static registered with binfmt_misc, for RUN steps and smoke runs of foreign architectures."""
    foreign = [arch for arch in arches if arch != HOST_ARCH]
    if not foreign:
        return
    if not all(shutil.which(f"{QEMU[arch]}-static") for arch in foreign) or not shutil.which("update-binfmts"):
        print("images: installing qemu-user-static and binfmt-support from Debian's packages", flush=True)
        run("apt-get", "install", "-y", "-q", "qemu-user-static", "binfmt-support")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        run("mount", "-t", "binfmt_misc", "binfmt_misc", binfmt)
    for arch in foreign:
        if not (binfmt / QEMU[arch]).exists():
            run("update-binfmts", "--enable", QEMU[arch])


def build_home() -> Path:
    """A HOME for the build's RUN steps, bind-mounted over /root (which the base has, so the mount leaves
    nothing in a layer): a pip.conf with the host pip's network settings and the CA bundle they name. The
    Dockerfiles and the images stay free of this machine's settings."""
    home = CACHE / "build-home"
    # Its .cache keeps pip's wheel cache from one build to the next (the flavours share most wheels).
    shutil.rmtree(home / ".config", ignore_errors=True)
    (home / ".config" / "pip").mkdir(parents=True)
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], check=False, text=True, capture_output=True
    ).stdout
    settings = pip_settings(listing)
    if "cert" in settings:
        shutil.copyfile(settings["cert"], home / ".config" / "pip" / "ca.pem")
        settings["cert"] = "/root/.config/pip/ca.pem"
    lines = ["[global]", *(f"{key} = {value}" for key, value in sorted(settings.items()))]
    (home / ".config" / "pip" / "pip.conf").write_text("\n".join(lines) + "\n")
    return home


# --- the images ---------------------------------------------------------------------------------------------


def base_ref(arch: str) -> str:
    return BASE_REF if arch == HOST_ARCH else f"{BASE_REF}-{arch}"


def build_base(force: bool, arch: str = HOST_ARCH) -> str:
    """localhost/edgeloop/debian:bookworm-slim (-<arch> for a foreign architecture) from debootstrap, unless built
    from the same recipe already; returns its image ID."""
    ref = base_ref(arch)
    suffix = "" if arch == HOST_ARCH else f"-{arch}"
    stamp = CACHE / f"base{suffix}.json"
    recipe = base_recipe_digest()
    if not force and stamp.exists():
        recorded = json.loads(stamp.read_text())
        if recorded["recipe"] == recipe and image_id(ref) == recorded["image_id"]:
            return recorded["image_id"]
    started = time.monotonic()
    log = CACHE / "logs" / f"base{suffix}.log"
    log.unlink(missing_ok=True)
    print(
        f"images: base {ref}: debootstrap --arch={arch} --variant=minbase {DEBIAN_SUITE} {DEBIAN_MIRROR} (log: {log})",
        flush=True,
    )
    container = buildah("from", "scratch", capture=True)
    mount = Path(buildah("mount", container, capture=True))
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as rootfs:
        run("debootstrap", f"--arch={arch}", "--variant=minbase", DEBIAN_SUITE, rootfs, DEBIAN_MIRROR, log=log)
        run("cp", "-a", f"{rootfs}/.", mount)
    buildah("run", "--isolation", "chroot", "--network", "host", container, "--", "sh", "-c", BASE_SETUP, log=log)
    # debootstrap copied this machine's name and resolver in; a container gets both from its runtime.
    for name in ("etc/hostname", "etc/resolv.conf"):
        (mount / name).write_text("")
    created_by = f"debootstrap --variant=minbase {DEBIAN_SUITE} {DEBIAN_MIRROR}, slimmed by images/build.py"
    buildah("config", "--arch", arch, "--env", f"PATH={DEFAULT_PATH}", "--cmd", "bash", "--created-by", created_by,
            container)  # fmt: skip
    buildah("commit", "--rm", "--quiet", container, ref, capture=True)
    base_id = image_id(ref)
    stamp.write_text(json.dumps({"ref": ref, "recipe": recipe, "image_id": base_id}, indent=2) + "\n")
    print(f"images: base built in {time.monotonic() - started:.0f} s", flush=True)
    return base_id


@dataclass(frozen=True)
class Plan:
    name: str
    ref: str
    dockerfile: Path
    context: Path
    build_args: dict[str, str]
    inputs: str  # input_digest
    arch: str = HOST_ARCH


def app_plan(name: str, base_id: str, arch: str = HOST_ARCH) -> Plan:
    """A runtime flavour or the operator: its own Dockerfile on the debootstrap base of `arch`."""
    build_args = {"BASE_IMAGE": base_ref(arch)}
    if name in RUNTIMES:
        dockerfile, context, pyproject = (
            REPO / "runtime-image" / "Dockerfile",
            REPO / "runtime-image",
            REPO / "runtime-image" / "pyproject.toml",
        )
        build_args["EXTRAS"] = RUNTIMES[name]
    else:
        dockerfile, context, pyproject = REPO / "operator" / "Dockerfile", REPO, REPO / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"]
    # Every stage must start from the base the build arg names (or from nothing), or the local build would need
    # a registry.
    if not set(from_images(dockerfile.read_text())) <= {"${BASE_IMAGE}", "scratch"}:
        sys.exit(f"images: every FROM in {dockerfile} must be ${{BASE_IMAGE}} or scratch")
    inputs = input_digest(dockerfile, copied_files(dockerfile, context), {**build_args, "base image": base_id})
    return Plan(name, f"ghcr.io/edgeloop/{name}:{version}", dockerfile, context, build_args, inputs, arch)


def pause_source() -> tuple[Path, str, str]:
    """build/pause of the Kubernetes release that devcluster/go.mod pins: (that directory in the Go module
    cache, the pause TAG from its Makefile, the Kubernetes version)."""
    if not shutil.which("go"):
        sys.exit("images: the pause image needs Go (its sources are the pinned Kubernetes module's build/pause)")
    devcluster = REPO / "devcluster"
    query = ("go", "list", "-m", "-f", "{{.Dir}} {{.Version}}", "k8s.io/kubernetes")
    directory, _, version = run(*query, capture=True, cwd=devcluster).partition(" ")
    if not directory:  # not downloaded yet
        run("go", "mod", "download", "k8s.io/kubernetes", cwd=devcluster)
        directory, _, version = run(*query, capture=True, cwd=devcluster).partition(" ")
    pause = Path(directory) / "build" / "pause"
    tag = re.search(r"^TAG \?= (\S+)$", (pause / "Makefile").read_text(), re.MULTILINE).group(1)
    return pause, tag, version


def pause_plan(arch: str = HOST_ARCH) -> tuple[Plan, list[str], Path]:
    """Upstream's pause Dockerfile with BASE=scratch; also returns the gcc flags and pause.c."""
    source, tag, version = pause_source()
    cflags = pause_cflags(tag, version)
    build_args = {"BASE": "scratch", "ARCH": arch}
    # What the Dockerfile ADDs is compiled from pause.c, so pause.c and the flags are the inputs.
    inputs = input_digest(
        source / "Dockerfile",
        {"linux/pause.c": source / "linux" / "pause.c"},
        {**build_args, "cflags": " ".join(cflags)},
    )
    context = CACHE / "pause-context"
    plan = Plan("pause", f"localhost/edgeloop/pause:{tag}", source / "Dockerfile", context, build_args, inputs, arch)
    return plan, cflags, source / "linux" / "pause.c"


def compile_pause(plan: Plan, cflags: list[str], pause_c: Path) -> None:
    """pause.c compiled for the plan's architecture (a cross compiler from Debian's packages for a foreign one)."""
    prefix = "" if plan.arch == HOST_ARCH else f"{CROSS[plan.arch]}-"
    if not shutil.which(f"{prefix}gcc"):
        run("apt-get", "install", "-y", "-q", *CROSS_PACKAGES[plan.arch])
    binary = plan.context / "bin" / f"pause-linux-{plan.arch}"
    binary.parent.mkdir(parents=True, exist_ok=True)
    run(f"{prefix}gcc", *cflags, "-o", binary, pause_c)
    run(f"{prefix}strip", binary)


def smoke_files() -> Path:
    """The digits model, its input and plain onnxruntime's answer, for the runtime images' smoke runs."""
    directory = CACHE / "smoke"
    run(sys.executable, REPO / "images" / "smoke_model.py", "prepare", directory)
    return directory


def image_config(ref: str) -> dict:
    """The image's OCI config (User, Env, ...); buildah 1.28's --format has no json function."""
    return json.loads(buildah("inspect", "--type", "image", ref, capture=True))["OCIv1"]["config"]


def smoke_in_chroot(mount: Path, config: dict, commands: tuple, smoke: Path, log: Path) -> None:
    """A foreign architecture's smoke run: chroot into the image's files (qemu through binfmt_misc), as its user,
    with its environment, and without /sys, under which onnxruntime crashes in qemu (`buildah run` mounts it)."""
    target = mount / "tmp" / "smoke"
    shutil.copytree(smoke, target, dirs_exist_ok=True)
    user = config.get("User") or "0:0"
    environment = dict(item.split("=", 1) for item in config.get("Env") or [])
    chroot = shutil.which("chroot")  # found on this machine's PATH, not the image's
    try:
        for command in commands:
            argv = [part.replace("/smoke/", "/tmp/smoke/") for part in command]
            run(chroot, f"--userspec={user}", mount, *argv, log=log, env=environment)
    finally:
        shutil.rmtree(target)


def build_arch(plan: Plan, tag: str, home: Path, smoke: Path | None, log: Path) -> dict:
    """Builds one architecture's image under `tag` and smoke-runs it; its unpacked size and ID."""
    args = [arg for key, value in plan.build_args.items() for arg in ("--build-arg", f"{key}={value}")]
    buildah("bud", "--isolation", "chroot", "--network", "host", "--pull=never", "--arch", plan.arch,
            "--volume", f"{home}:/root", *args, "--file", plan.dockerfile, "--tag", tag, plan.context,
            log=log)  # fmt: skip
    buildah("rmi", "--prune", capture=True)  # the stages' images and the tag's previous image
    container = buildah("from", "--pull=never", "--arch", plan.arch, tag, capture=True)
    try:
        mount = Path(buildah("mount", container, capture=True))
        unpacked = tree_bytes(mount)
        if plan.arch == HOST_ARCH:
            for command in SMOKE[plan.name]:
                buildah("run", "--isolation", "chroot", "--volume", f"{smoke}:/smoke:ro", container, "--", *command,
                        log=log)  # fmt: skip
        else:
            smoke_in_chroot(mount, image_config(tag), SMOKE[plan.name], smoke, log)
    finally:
        buildah("rm", container, capture=True)
    return {"unpacked_bytes": unpacked, "image_id": "sha256:" + image_id(tag)}


def archive_sizes(archive: Path) -> dict[str, int]:
    """Per architecture, the bytes of an OCI archive's image: its manifest, config and (compressed) layers."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> dict:
            return json.load(tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}"))

        sizes = {}
        manifests = json.load(tar.extractfile("index.json"))["manifests"]
        if manifests and manifests[0]["mediaType"].endswith("image.index.v1+json"):  # an index inside the index
            manifests = blob(manifests[0]["digest"])["manifests"]
        for entry in manifests:
            manifest = blob(entry["digest"])
            arch = entry.get("platform", {}).get("architecture") or blob(manifest["config"]["digest"])["architecture"]
            layers = sum(layer["size"] for layer in manifest["layers"])
            sizes[arch] = entry["size"] + manifest["config"]["size"] + layers
        return sizes


def combined_inputs(plans: list[Plan]) -> str:
    if len(plans) == 1:
        return plans[0].inputs
    joined = "\n".join(f"{plan.arch} {plan.inputs}" for plan in plans)
    return "sha256:" + hashlib.sha256(joined.encode()).hexdigest()


def build(plans: list[Plan], home: Path, smoke: Path | None) -> dict:
    """Builds the image for each plan's architecture, checks each runs and writes one OCI archive (an image
    index when there are several); returns its images.json entry."""
    started = time.monotonic()
    name, ref = plans[0].name, plans[0].ref
    log = CACHE / "logs" / f"{name}.log"
    log.unlink(missing_ok=True)
    arches = [plan.arch for plan in plans]
    print(f"images: building {ref} for {', '.join(arches)} (log: {log})", flush=True)
    multi = len(plans) > 1
    platforms = {plan.arch: build_arch(plan, f"{ref}-{plan.arch}" if multi else ref, home, smoke, log)
                 for plan in plans}  # fmt: skip
    build_seconds = time.monotonic() - started

    archive = CACHE / f"{name}.oci.tar"
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    # The ref after the path becomes the index's org.opencontainers.image.ref.name: containerd names the
    # imported image by it.
    if multi:
        subprocess.run(["buildah", *storage_options(), "rmi", ref], capture_output=True, check=False)
        subprocess.run(["buildah", *storage_options(), "manifest", "rm", ref], capture_output=True, check=False)
        buildah("manifest", "create", ref, capture=True)
        for arch in arches:
            buildah("manifest", "add", ref, f"containers-storage:{ref}-{arch}", capture=True)
        buildah("manifest", "push", "--quiet", "--all", "--format", "oci", ref, f"oci-archive:{partial}:{ref}",
                log=log)  # fmt: skip
    else:
        buildah("push", "--quiet", "--format", "oci", ref, f"oci-archive:{partial}:{ref}", log=log)
    partial.rename(archive)
    for arch, size in archive_sizes(archive).items():
        platforms[arch]["bytes"] = size
    main_arch = HOST_ARCH if HOST_ARCH in platforms else arches[0]
    return {
        "name": name,
        "ref": ref,
        "archive": str(archive),
        "bytes": archive.stat().st_size,
        "unpacked_bytes": platforms[main_arch]["unpacked_bytes"],
        "image_id": platforms[main_arch]["image_id"],
        "platforms": platforms,
        "inputs": combined_inputs(plans),
        "build_seconds": round(build_seconds, 1),
    }


def up_to_date(entry: dict | None, plans: list[Plan]) -> bool:
    if not entry or entry.get("inputs") != combined_inputs(plans) or entry.get("ref") != plans[0].ref:
        return False
    archive = Path(entry["archive"])
    return archive.exists() and archive.stat().st_size == entry["bytes"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=NAMES, action="append",
                        help=f"build only this image (repeatable; default: {', '.join(DEFAULT)})")  # fmt: skip
    parser.add_argument("--arch", default=HOST_ARCH,
                        help=f"comma-separated architectures ({', '.join(ARCHES)}); more than one makes each archive "
                             f"an OCI image index (default: {HOST_ARCH}, this machine's)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="rebuild even when the inputs did not change")
    options = parser.parse_args(argv)
    names = options.only or list(DEFAULT)
    arches = options.arch.split(",")
    if unknown := set(arches) - set(ARCHES):
        parser.error(f"unknown architecture(s) {sorted(unknown)}; known: {', '.join(ARCHES)}")

    ensure_tools()
    ensure_emulation(arches)
    (CACHE / "logs").mkdir(parents=True, exist_ok=True)
    index = json.loads(INDEX.read_text()) if INDEX.exists() else {"images": []}
    entries = {entry["name"]: entry for entry in index["images"]}
    home = build_home()
    needs_base = {*RUNTIMES, "operator"} & set(names)
    base_ids = {arch: build_base(options.force, arch) for arch in arches} if needs_base else {}
    smoke = smoke_files() if set(RUNTIMES) & set(names) else None

    rows = []
    for name in names:
        started = time.monotonic()
        image_arches = [arch for arch in arches if ONE_ARCH.get(name, arch) == arch]
        if not image_arches:
            print(f"images: {name} exists for {ONE_ARCH[name]} only; skipped")
            continue
        if name == "pause":
            pauses = [pause_plan(arch) for arch in image_arches]
            plans = [plan for plan, _, _ in pauses]
        else:
            plans = [app_plan(name, base_ids[arch], arch) for arch in image_arches]
        if not options.force and up_to_date(entries.get(name), plans):
            rows.append((entries[name], "cached", time.monotonic() - started))
            continue
        if name == "pause":
            shutil.rmtree(plans[0].context, ignore_errors=True)
            for plan, cflags, pause_c in pauses:
                compile_pause(plan, cflags, pause_c)
        entries[name] = build(plans, home, smoke)
        INDEX.write_text(json.dumps({"images": [entries[n] for n in NAMES if n in entries]}, indent=2) + "\n")
        rows.append((entries[name], "built", time.monotonic() - started))

    print(f"images: {INDEX}")
    for entry, state, seconds in rows:
        print(f"  {entry['ref']:<42} {state:<6} {seconds:6.1f} s   archive {megabytes(entry['bytes']):>9}   "
              f"{entry['archive']}")  # fmt: skip
        for arch, platform in sorted(entry.get("platforms", {}).items()):
            print(f"      {arch:<6} layers {megabytes(platform['bytes']):>9}   "
                  f"unpacked {megabytes(platform['unpacked_bytes']):>9}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
