"""The pure parts of images/build.py (`make images`): what defines an image's inputs, and the Dockerfiles'
contract with the local build (every stage FROM the BASE_IMAGE build arg). Needs no buildah."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
DOCKERFILES = [REPO / "runtime-image" / "Dockerfile", REPO / "operator" / "Dockerfile"]

_spec = importlib.util.spec_from_file_location("images_build", REPO / "images" / "build.py")
build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = build  # dataclasses look their module up there
_spec.loader.exec_module(build)

DOCKERFILE = """\
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE} AS build
COPY pyproject.toml ./
# a comment between instructions
COPY --chown=1:1 pkg ./pkg
RUN echo one \\
    # a comment inside a continued RUN
    && echo two
FROM ${BASE_IMAGE}
COPY --from=build /opt/app /opt/app
"""


@pytest.fixture
def context(tmp_path: Path) -> Path:
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "sub" / "mod.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("not copied\n")
    return tmp_path


def digest(context: Path, **extra: str) -> str:
    dockerfile = context / "Dockerfile"
    return build.input_digest(dockerfile, build.copied_files(dockerfile, context), extra)


def test_copied_sources_skips_flags_destinations_and_other_stages():
    assert build.copied_sources(DOCKERFILE) == ["pyproject.toml", "pkg"]


def test_comments_inside_a_continued_instruction_are_dropped():
    assert "RUN echo one      && echo two" in build.dockerfile_instructions(DOCKERFILE)


def test_input_digest_changes_when_a_copied_file_changes(context: Path):
    before = digest(context)
    assert digest(context) == before
    (context / "pkg" / "sub" / "mod.py").write_text("x = 2\n")
    assert digest(context) != before


def test_input_digest_changes_when_a_copied_file_is_added_or_renamed(context: Path):
    before = digest(context)
    (context / "pkg" / "sub" / "new.py").write_text("")
    added = digest(context)
    assert added != before
    (context / "pkg" / "sub" / "new.py").rename(context / "pkg" / "sub" / "other.py")
    assert digest(context) not in (before, added)


def test_input_digest_ignores_files_not_copied_and_bytecode(context: Path):
    before = digest(context)
    (context / "README.md").write_text("changed\n")
    (context / "pkg" / "sub" / "__pycache__").mkdir()
    (context / "pkg" / "sub" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    assert digest(context) == before


def test_input_digest_changes_with_the_dockerfile_and_the_base(context: Path):
    before = digest(context, base="sha256:1")
    assert digest(context, base="sha256:2") != before
    (context / "Dockerfile").write_text(DOCKERFILE + "USER 65532:65532\n")
    assert digest(context, base="sha256:1") != before


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_every_stage_starts_from_the_base_image_build_arg(dockerfile: Path):
    text = dockerfile.read_text()
    assert "ARG BASE_IMAGE=debian:bookworm-slim" in build.dockerfile_instructions(text)
    stages = build.from_images(text)
    assert len(stages) == 2  # the build stage and the final one
    assert stages[0] == "${BASE_IMAGE}" and stages[1] in ("${BASE_IMAGE}", "scratch")


def test_runtime_inputs_are_its_project_file_slim_script_and_package():
    dockerfile = REPO / "runtime-image" / "Dockerfile"
    files = build.copied_files(dockerfile, dockerfile.parent)
    assert {"pyproject.toml", "slim.py", "edgeloop_runtime/cli.py"} <= set(files)
    assert all(name in ("pyproject.toml", "slim.py") or name.startswith("edgeloop_runtime/") for name in files)
    assert not any(name.endswith(".pyc") for name in files)


def test_each_runtime_flavour_installs_extras_the_runtime_defines():
    extras = build.tomllib.loads((REPO / "runtime-image" / "pyproject.toml").read_text())["project"]
    for flavour, wanted in build.RUNTIMES.items():
        assert set(wanted.split(",")) <= set(extras["optional-dependencies"]), flavour
    assert "runtime-cuda" not in build.DEFAULT, "the CUDA flavour is built on request only"
    assert {"runtime", "runtime-openvino", "runtime-federated", "operator", "pause"} == set(build.DEFAULT)


def test_flavours_differ_in_their_inputs():
    plans = {name: build.app_plan(name, "sha256:base") for name in build.RUNTIMES}
    assert len({plan.inputs for plan in plans.values()}) == len(plans)
    assert plans["runtime-openvino"].build_args["EXTRAS"] == "openvino"
    assert plans["runtime-openvino"].ref.startswith("ghcr.io/edgeloop/runtime-openvino:")


def test_operator_inputs_are_the_root_project_files_and_the_operator_package():
    files = build.copied_files(REPO / "operator" / "Dockerfile", REPO)
    assert {"pyproject.toml", "README.md", "operator/edgeloop/cli.py"} <= set(files)
    assert all(name in ("pyproject.toml", "README.md") or name.startswith("operator/") for name in files)


def test_pip_settings_passes_network_settings_only_and_the_environment_wins():
    listing = (
        "global.cert='/etc/ssl/certs/ca-certificates.crt'\n"
        "global.index-url='https://mirror.example/simple'\n"
        ":env:.cert='/etc/ssl/proxy-ca.pem'\n"
        ":env:.find-links='/opt/wheels'\n"
        ":env:.disable-pip-version-check='1'\n"
        ":env:.default-timeout='180'\n"
    )
    assert build.pip_settings(listing) == {
        "cert": "/etc/ssl/proxy-ca.pem",
        "index-url": "https://mirror.example/simple",
        "default-timeout": "180",
    }


def test_pause_is_compiled_with_upstreams_flags():
    assert build.pause_cflags("3.10.1", "v1.34.4") == [
        "-Os",
        "-Wall",
        "-Werror",
        "-static",
        "-DVERSION=v3.10.1-v1.34.4",
    ]


def test_archive_sizes_per_architecture_of_an_image_and_of_an_index(tmp_path: Path):
    import io
    import json
    import tarfile

    def write(tar, document: dict | bytes) -> tuple[str, int]:
        data = document if isinstance(document, bytes) else json.dumps(document).encode()
        digest = build.hashlib.sha256(data).hexdigest()
        info = tarfile.TarInfo(f"blobs/sha256/{digest}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        return f"sha256:{digest}", len(data)

    def image(tar, arch: str, layer_sizes: list[int]) -> dict:
        config, config_size = write(tar, {"architecture": arch})
        layers = [{"digest": f"sha256:{i}", "size": size} for i, size in enumerate(layer_sizes)]
        digest, size = write(tar, {"config": {"digest": config, "size": config_size}, "layers": layers})
        return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
                "extra": config_size + sum(layer_sizes)}  # fmt: skip

    single, multi = tmp_path / "single.tar", tmp_path / "multi.tar"
    with tarfile.open(single, "w") as tar:
        amd64 = image(tar, "amd64", [100, 20])
        index = json.dumps({"manifests": [{k: v for k, v in amd64.items() if k != "extra"}]}).encode()
        info = tarfile.TarInfo("index.json")
        info.size = len(index)
        tar.addfile(info, io.BytesIO(index))
    assert build.archive_sizes(single) == {"amd64": amd64["size"] + amd64["extra"]}
    with tarfile.open(multi, "w") as tar:
        entries = {arch: image(tar, arch, sizes) for arch, sizes in (("amd64", [100]), ("arm64", [90, 5]))}
        listed = [{**{k: v for k, v in e.items() if k != "extra"}, "platform": {"architecture": arch}}
                  for arch, e in entries.items()]  # fmt: skip
        nested, size = write(tar, {"manifests": listed})
        index = json.dumps({"manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                                           "digest": nested, "size": size}]}).encode()  # fmt: skip
        info = tarfile.TarInfo("index.json")
        info.size = len(index)
        tar.addfile(info, io.BytesIO(index))
    assert build.archive_sizes(multi) == {arch: e["size"] + e["extra"] for arch, e in entries.items()}


_slim_spec = importlib.util.spec_from_file_location("runtime_slim", REPO / "runtime-image" / "slim.py")
slim = importlib.util.module_from_spec(_slim_spec)
_slim_spec.loader.exec_module(slim)


def test_slim_keeps_a_dependency_another_package_needs(tmp_path: Path):
    def dist(name: str, *requires: str) -> None:
        info = tmp_path / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("".join(f"Requires-Dist: {r}\n" for r in requires))

    dist("ai_edge_litert", "ml_dtypes", "numpy")
    dist("tritonclient", "numpy", "ml-dtypes ; extra == 'all'")  # only as an extra: does not count
    assert slim.required_by(tmp_path, "ml_dtypes") == {"ai-edge-litert"}
    dist("onnx", "ml_dtypes>=0.5.0", "protobuf")
    assert slim.required_by(tmp_path, "ml_dtypes") == {"ai-edge-litert", "onnx"}
