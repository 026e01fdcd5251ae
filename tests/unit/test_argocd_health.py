"""The Argo CD health checks in docs/gitops, run by a Lua 5.1 interpreter (Argo CD runs gopher-lua, Lua 5.1)
with only the libraries Argo CD opens, on the cases of each health_test.yaml (Argo CD's own test layout).
The InferenceModel testdata are objects captured from the devcluster by tests/e2e/test_chart.py
(EDGELOOP_CAPTURE_ARGOCD_TESTDATA=docs/gitops/argocd/health/edgeloop.io)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from edgeloop import testing

GITOPS = Path(__file__).parents[2] / "docs" / "gitops" / "argocd"
HEALTH = GITOPS / "health" / "edgeloop.io"
KINDS = ("InferenceModel", "FederatedRound")


def argocd_health(kind: str, obj: dict) -> dict:
    return testing.argocd_health(HEALTH / kind / "health.lua", obj)


def cases():
    for kind in KINDS:
        for case in yaml.safe_load((HEALTH / kind / "health_test.yaml").read_text())["tests"]:
            yield pytest.param(kind, case, id=f"{kind}-{Path(case['inputPath']).stem}")


@pytest.mark.parametrize(("kind", "case"), list(cases()))
def test_health_of_testdata(kind, case):
    obj = yaml.safe_load((HEALTH / kind / case["inputPath"]).read_text())
    assert argocd_health(kind, obj) == case["healthStatus"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_testdata_file_has_a_case(kind):
    listed = {case["inputPath"] for case in yaml.safe_load((HEALTH / kind / "health_test.yaml").read_text())["tests"]}
    on_disk = {f"testdata/{p.name}" for p in (HEALTH / kind / "testdata").glob("*.yaml")}
    assert listed == on_disk


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_object_is_progressing(kind):
    obj = {"apiVersion": "edgeloop.io/v1alpha1", "kind": kind, "metadata": {"name": "x", "generation": 1}}
    assert argocd_health(kind, obj)["status"] == "Progressing"


def test_the_argocd_cm_snippet_carries_the_same_scripts():
    config_map = yaml.safe_load((GITOPS / "argocd-cm.yaml").read_text())
    for kind in KINDS:
        key = f"resource.customizations.health.edgeloop.io_{kind}"
        assert config_map["data"][key] == (HEALTH / kind / "health.lua").read_text()
