"""The FederatedRound CRD: generated from the API models, structural, and saying what admission enforces.
(That crds/ is up to date is checked for every CRD in test_crds.py; the API server's verdicts are e2e.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CRD = Path(__file__).parents[2] / "crds" / "edgeloop.io_federatedrounds.yaml"


@pytest.fixture(scope="module")
def crd() -> dict:
    return yaml.safe_load(CRD.read_text())


@pytest.fixture(scope="module")
def spec(crd) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def walk(node, path="spec"):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from walk(node[key], f"{path}[{key}]")


def test_names_columns_and_status_subresource(crd):
    names = crd["spec"]["names"]
    assert (names["kind"], names["shortNames"], names["categories"]) == ("FederatedRound", ["fr"], ["edgeloop"])
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Phase", "Round", "Clients", "Accuracy", "Promoted", "Age"]
    accuracy = next(c for c in version["additionalPrinterColumns"] if c["name"] == "Accuracy")
    assert (accuracy["jsonPath"], accuracy["type"]) == (".status.accuracy", "string"), "0.972, not 0.9722222222222222"


def test_structural_and_described_for_kubectl_explain(spec):
    for path, node in walk(spec):
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title"} & node.keys(), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if not path.endswith("]"):
            assert node.get("description"), f"{path} has no description"


def test_bounds_become_openapi_bounds(spec):
    threshold = spec["properties"]["secureAggregation"]["properties"]["threshold"]
    assert (threshold["minimum"], threshold["exclusiveMinimum"], threshold["maximum"]) == (0, True, 1)
    rate = spec["properties"]["training"]["properties"]["learningRate"]
    assert (rate["minimum"], rate["exclusiveMinimum"]) == (0, True)


def test_cross_field_rules_are_cel(spec):
    def rules(node):
        return [r["rule"] for r in node.get("x-kubernetes-validations", [])]

    props = spec["properties"]
    assert rules(props["participants"]) == ["self.minClients <= self.maxClients"]
    assert rules(props["privacy"]) == ["self.noiseMultiplier == 0.0 || has(self.clipNorm)"]
    assert rules(props["training"]) == ["self.strategy == 'fedprox' || self.proximalMu == 0.0"]
    assert rules(spec) == [
        "has(self.modelRef) || has(self.model)", "!has(self.model) || self.model.format == 'onnx'", "self == oldSelf"]
    assert rules(props["dataset"]) == ["has(self.name) != has(self.hostPath)"]


def test_sections_default_whole_and_the_dataset_is_required(spec):
    assert spec["required"] == ["dataset"]
    assert spec["properties"]["participants"]["default"] == {
        "nodeSelector": {},
        "tolerations": [],
        "minClients": 3,
        "maxClients": 20,
    }
    assert spec["properties"]["secureAggregation"]["default"] == {"enabled": True, "threshold": 0.66}
    assert spec["properties"]["deadlineSeconds"]["default"] == 900
