"""The CRDs under crds/ are generated from the API models, are structural, and say what admission enforces."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from edgeloop import config, crdgen

CRDS = Path(__file__).parents[2] / "crds"


@pytest.fixture(scope="module")
def crd() -> dict:
    return yaml.safe_load((CRDS / "edgeloop.io_inferencemodels.yaml").read_text())


@pytest.fixture(scope="module")
def schema(crd) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crds_directory_is_up_to_date():
    expected = crdgen.render_all(config.build())
    on_disk = {path.name: path.read_text() for path in CRDS.glob("*.yaml")}
    assert on_disk == expected, "crds/ is stale: run `make crds` (python -m edgeloop.crdgen)"


def test_check_mode_reports_a_stale_file(tmp_path):
    assert crdgen.main(["--output-dir", str(tmp_path), "--check"]) == 1
    assert crdgen.main(["--output-dir", str(tmp_path)]) == 0
    assert crdgen.main(["--output-dir", str(tmp_path), "--check"]) == 0


def _walk(node, path="$"):
    yield path, node
    for key in ("properties",):
        for name, child in node.get(key, {}).items():
            yield from _walk(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _walk(node[key], f"{path}[{key}]")


def test_schema_is_structural(schema):
    for path, node in _walk(schema):
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title", "$defs"} & node.keys(), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert node.get("default", "") is not None, f"{path} defaults to null"
        assert not any(key.startswith("x-edgeloop") for key in node), path


def test_every_spec_field_is_described_for_kubectl_explain(schema):
    for path, node in _walk(schema["properties"]["spec"], "spec"):
        if not path.endswith("]"):
            assert node.get("description"), f"{path} has no description"


def test_names_columns_and_status_subresource(crd):
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["im"] and names["categories"] == ["edgeloop"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [column["name"] for column in version["additionalPrinterColumns"] if not column.get("priority")]
    assert columns == ["Ready", "Nodes", "Model Version", "Accelerated", "Age"]


def test_defaults_fill_omitted_sections(schema):
    spec = schema["properties"]["spec"]["properties"]
    assert spec["serving"]["default"] == {"httpPort": 8000, "grpcPort": 8001, "nodeLocal": True}
    assert spec["runtime"]["default"]["maxBatchSize"] == 8
    assert spec["runtime"]["properties"]["maxBatchSize"]["default"] == 8
    assert spec["serving"]["properties"]["nodeLocal"]["default"] is True
    assert spec["rollout"]["properties"]["maxUnavailable"]["default"] == "10%"


def test_accelerators_accept_only_configured_classes_once_with_catch_all_last(schema):
    accelerators = schema["properties"]["spec"]["properties"]["placement"]["properties"]["accelerators"]
    assert accelerators["items"]["enum"] == ["npu", "gpu", "cpu"]
    assert accelerators["minItems"] == 1 and accelerators["x-kubernetes-list-type"] == "set"
    [rule] = accelerators["x-kubernetes-validations"]
    assert "'cpu'" in rule["rule"] and "must come last" in rule["message"]


def test_a_configured_class_set_changes_the_enum(tmp_path):
    overrides = tmp_path / "values.yaml"
    overrides.write_text(yaml.safe_dump({"acceleratorClasses": {
        "npu": None,
        "hailo": {"matchAnyLabel": {"edgeloop.io/accelerator.hailo": "true"}, "resource": "hailo.ai/npu",
                  "executionProviders": ["CPUExecutionProvider"]},
    }}))
    rendered = crdgen.render_all(config.load(overrides))["edgeloop.io_inferencemodels.yaml"]
    schema = yaml.safe_load(rendered)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    accelerators = schema["properties"]["spec"]["properties"]["placement"]["properties"]["accelerators"]
    assert accelerators["items"]["enum"] == ["gpu", "cpu", "hailo"]


def test_cross_field_rules_are_cel(schema):
    spec = schema["properties"]["spec"]["properties"]
    serving_rules = [r["rule"] for r in spec["serving"]["x-kubernetes-validations"]]
    assert serving_rules == ["self.httpPort != self.grpcPort"]
    assert "maxUnavailable" in spec["rollout"]["properties"]["maxUnavailable"]["x-kubernetes-validations"][0]["message"]
    assert "metadata.name" in schema["x-kubernetes-validations"][0]["rule"]
