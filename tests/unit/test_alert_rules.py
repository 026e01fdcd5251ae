"""The chart's alerting rules, as the chart renders them: valid for `promtool check rules`, and each alert
firing (and only then) on the series that its inputs have, by `promtool test rules`. The e2e tier evaluates the
same expressions against a real Prometheus scraping real nodes (tests/e2e/test_real_nodes_observability.py)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from test_chart import needs_helm, template

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian: prometheus)")

MODEL = 'namespace="edge",model="digits"'
IM = 'namespace="edge",inferencemodel="digits"'


def rule_groups(*sets: str) -> list[dict]:
    [rule] = [d for d in template("monitoring.prometheusRule.enabled=true", *sets) if d["kind"] == "PrometheusRule"]
    return rule["spec"]["groups"]


def alert(name: str, at: str, *labels: dict[str, str]) -> dict:
    return {
        "eval_time": at,
        "alertname": name,
        "exp_alerts": [{"exp_labels": {"severity": "warning", **one}} for one in labels],
    }


CASES = {
    "a model not Ready for 10 minutes": (
        [
            {
                "series": f'edgeloop_inferencemodel_condition{{{IM},condition="Ready",status="False",'
                'reason="FetchFailed"}',
                "values": "0x20",
            },
            {
                "series": 'edgeloop_inferencemodel_condition{namespace="edge",inferencemodel="ok",condition="Ready",'
                'status="True",reason="AllNodesReady"}',
                "values": "1x20",
            },
        ],
        [
            alert("EdgeloopModelNotReady", "9m"),
            alert("EdgeloopModelNotReady", "11m", {"namespace": "edge", "inferencemodel": "digits"}),
        ],
    ),
    "a node on an old version for 30 minutes while it answers": (
        [
            {"series": f'edgeloop_inferencemodel_info{{{IM},version="2",sha256="b"}}', "values": "1x40"},
            {"series": f'edgeloop_model_info{{{MODEL},node="n1",version="1",sha256="a"}}', "values": "1x40"},
            {"series": f'edgeloop_model_info{{{MODEL},node="n2",version="2",sha256="b"}}', "values": "1x40"},
            # A model the operator does not know (or no operator metrics at all): nothing to compare with.
            {
                "series": 'edgeloop_model_info{namespace="edge",model="stray",node="n1",version="1",sha256="c"}',
                "values": "1x40",
            },
        ],
        [
            alert("EdgeloopNodeOnOldVersion", "29m"),
            alert(
                "EdgeloopNodeOnOldVersion",
                "31m",
                {"namespace": "edge", "model": "digits", "node": "n1", "version": "1"},
            ),
        ],
    ),
    "a CPU fallback": (
        [
            {"series": f'edgeloop_inferencemodel_cpu_fallback{{{IM},accelerator="gpu"}}', "values": "1x10"},
            {"series": f'edgeloop_inferencemodel_cpu_fallback{{{IM},accelerator="npu"}}', "values": "0x10"},
        ],
        [alert("EdgeloopCPUFallback", "6m", {"namespace": "edge", "inferencemodel": "digits", "accelerator": "gpu"})],
    ),
    "errors over 5 %": (
        [
            {"series": f'nv_inference_request_success{{{MODEL},version="1",node="n1"}}', "values": "0+600x20"},
            {
                "series": f'nv_inference_request_failure{{{MODEL},version="1",node="n1",reason="BACKEND"}}',
                "values": "0+60x20",
            },  # 60 of 660 a minute: 9 %
            {
                "series": 'nv_inference_request_success{namespace="edge",model="fine",version="1",node="n1"}',
                "values": "0+600x20",
            },
            {
                "series": 'nv_inference_request_failure{namespace="edge",model="fine",version="1",node="n1",'
                'reason="BACKEND"}',
                "values": "0+6x20",
            },
        ],  # 1 %
        [alert("EdgeloopHighErrorRate", "12m", {"namespace": "edge", "model": "digits"})],
    ),
    "a p99 over half a second": (
        [
            {
                "series": f'edgeloop_request_duration_seconds_bucket{{{MODEL},protocol="http",le="0.1"}}',
                "values": "0+90x20",
            },
            {
                "series": f'edgeloop_request_duration_seconds_bucket{{{MODEL},protocol="http",le="1"}}',
                "values": "0+100x20",
            },
            {
                "series": f'edgeloop_request_duration_seconds_bucket{{{MODEL},protocol="http",le="+Inf"}}',
                "values": "0+100x20",
            },
        ],
        [
            alert("EdgeloopHighLatency", "9m"),
            alert("EdgeloopHighLatency", "16m", {"namespace": "edge", "model": "digits"}),
        ],
    ),
    "a failed round": (
        [
            {"series": f'edgeloop_federatedround_phase{{{IM},federatedround="r1",phase="Failed"}}', "values": "1x3"},
            {"series": f'edgeloop_federatedround_phase{{{IM},federatedround="r2",phase="Failed"}}', "values": "0x3"},
        ],
        [
            alert(
                "EdgeloopFederatedRoundFailed",
                "1m",
                {"namespace": "edge", "inferencemodel": "digits", "federatedround": "r1"},
            )
        ],
    ),
}


def promtool_run(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_helm
@needs_promtool
def test_promtool_checks_the_rendered_rules(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    result = promtool_run("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0 and "SUCCESS: 6 rules found" in result.stdout, result.stdout + result.stderr


@needs_helm
@needs_promtool
@pytest.mark.parametrize("case", CASES)
def test_each_alert_fires_on_its_condition_only(tmp_path, case):
    series, expected = CASES[case]
    groups = rule_groups()
    for rule in groups[0]["rules"]:
        rule.pop("annotations")  # promtool compares annotations only when a test names them
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": expected}],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests))
    result = promtool_run("test", "rules", "test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
def test_thresholds_and_runbooks_come_from_the_values():
    rules = {
        r["alert"]: r
        for r in rule_groups("monitoring.prometheusRule.p99Seconds=0.25", "monitoring.prometheusRule.notReadyFor=3m")[
            0
        ]["rules"]
    }
    assert rules["EdgeloopHighLatency"]["expr"].endswith("> 0.25")
    assert rules["EdgeloopModelNotReady"]["for"] == "3m"
    for name, rule in rules.items():
        assert rule["annotations"]["runbook_url"].endswith(f"docs/observability.md#{name.lower()}")
