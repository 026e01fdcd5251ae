"""Operator configuration: built-in accelerator classes, and files merged over them (the Helm values)."""

from __future__ import annotations

import pytest
import yaml
from edgeloop import config


def write(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_built_in_classes():
    built_in = config.build()
    assert list(built_in.accelerator_classes) == ["npu", "gpu", "cpu"]
    gpu = built_in.accelerator_class("gpu")
    assert gpu.resource == "nvidia.com/gpu" and gpu.runtime_class_name == "nvidia"
    assert {"edgeloop.io/accelerator.gpu", "nvidia.com/gpu.present"} <= set(gpu.match_any_label)
    assert "feature.node.kubernetes.io/pci-10de.present" in gpu.match_any_label
    assert built_in.accelerator_class("npu").resource == "npu.intel.com/accel"
    assert built_in.accelerator_class("cpu").is_catch_all
    for cls in built_in.accelerator_classes.values():
        assert cls.execution_providers[-1] == "CPUExecutionProvider"
    assert built_in.runtime_image.startswith("ghcr.io/edgeloop/runtime:")
    images = {name: built_in.image_of(cls) for name, cls in built_in.accelerator_classes.items()}
    assert images == {
        "npu": built_in.runtime_image.replace("runtime:", "runtime-openvino:"),
        "gpu": built_in.runtime_image.replace("runtime:", "runtime-cuda:"),
        "cpu": built_in.runtime_image,
    }, "each class runs the flavour that has its execution providers"
    assert built_in.federated_image == built_in.runtime_image.replace("runtime:", "runtime-federated:")


def test_a_file_overrides_fields_adds_and_removes_classes(tmp_path):
    loaded = config.load(write(tmp_path, {
        "runtimeImage": "registry.local/edgeloop/runtime:dev",
        "acceleratorClasses": {
            "gpu": {"runtimeClassName": None, "allowCpuFallback": True},
            "npu": None,
            "rockchip": {
                "matchAnyLabel": {"edgeloop.io/accelerator.rockchip": "true"},
                "resource": "rockchip.com/npu",
                "executionProviders": ["RknpuExecutionProvider", "CPUExecutionProvider"],
            },
        },
    }))
    assert loaded.runtime_image == "registry.local/edgeloop/runtime:dev"
    assert list(loaded.accelerator_classes) == ["gpu", "cpu", "rockchip"]
    gpu = loaded.accelerator_class("gpu")
    assert gpu.runtime_class_name is None and gpu.allow_cpu_fallback
    assert gpu.resource == "nvidia.com/gpu", "fields not given keep their built-in value"
    assert loaded.accelerator_class("rockchip").resource == "rockchip.com/npu"


def test_a_bad_pull_policy_is_refused(tmp_path):
    with pytest.raises(config.ConfigError, match="imagePullPolicy"):
        config.build({"acceleratorClasses": {"gpu": {"imagePullPolicy": "Sometimes"}}})


def test_execution_providers_must_end_with_cpu(tmp_path):
    path = write(tmp_path, {"acceleratorClasses": {"gpu": {"executionProviders": ["CUDAExecutionProvider"]}}})
    with pytest.raises(config.ConfigError, match="must end with CPUExecutionProvider"):
        config.load(path)


@pytest.mark.parametrize("architectures", [["ARM64"], ["arm64; rm"], ["a"] * 17, "arm64"])
def test_architectures_are_a_short_list_of_kubernetes_arch_values(architectures):
    with pytest.raises(config.ConfigError, match="architectures"):
        config.build({"acceleratorClasses": {"gpu": {"architectures": architectures}}})


@pytest.mark.parametrize("content", ["- a list\n", "acceleratorClasses: {gpu: {bogus: 1}}\n", "{unclosed"])
def test_unusable_files_are_reported(tmp_path, content):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(config.ConfigError):
        config.load(path)


def test_unknown_class_names_the_configured_ones():
    with pytest.raises(config.ConfigError, match="unknown accelerator class 'tpu' \\(configured: npu, gpu, cpu\\)"):
        config.build().accelerator_class("tpu")


def test_prints_the_effective_configuration(capsys):
    assert config.main([]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["acceleratorClasses"]["gpu"]["resource"] == "nvidia.com/gpu"
    assert config.build(printed) == config.build(), "the printed configuration loads back unchanged"


def test_an_image_allowlist_must_allow_the_configured_images():
    allowed = config.build({"allowedImages": ["ghcr.io/edgeloop/*"]})
    assert allowed.image_allowed("ghcr.io/edgeloop/runtime:0.1.0")
    assert not allowed.image_allowed("docker.io/evil/runtime:1")
    assert config.build().image_allowed("anything:at-all"), "no allowlist: any image"
    with pytest.raises(config.ConfigError, match=r"registry\.example/runtime-cuda:1 is not in allowedImages"):
        config.build({"allowedImages": ["ghcr.io/edgeloop/*"],
                      "acceleratorClasses": {"gpu": {"image": "registry.example/runtime-cuda:1"}}})
