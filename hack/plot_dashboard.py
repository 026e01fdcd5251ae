"""Plot panels of the chart's Grafana dashboard from a running Prometheus, with the dashboard's own queries.

    python hack/plot_dashboard.py --prometheus URL --output docs/observability-e2e.png \
        [--minutes 10] [--set namespace=models] [--set model=digits] ["Panel title" ...]

The e2e (tests/e2e/test_real_nodes_observability.py) runs it against its real Prometheus when
EDGELOOP_PLOT_DASHBOARD names the output file: what docs/observability.md shows is what that run measured.
Needs matplotlib (not a dependency of edgeloop: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

DASHBOARD = Path(__file__).parents[1] / "charts" / "edgeloop" / "files" / "dashboard.json"
DEFAULT_PANELS = (
    "Request latency p99 by node",
    "Requests per second by node",
    "Nodes by variant and state",
    "Federated accuracy per training round",
)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{query}", timeout=30) as response:
        return json.loads(response.read())["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus's URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--output", required=True, type=Path, help="the PNG to write")
    parser.add_argument("--minutes", type=float, default=10, help="how far back (default 10)")
    parser.add_argument("--set", action="append", default=[], metavar="VARIABLE=VALUE",
                        help="a dashboard variable's value (default .* for each)")
    parser.add_argument("panels", nargs="*", default=DEFAULT_PANELS, help="panel titles")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variables = {"$__rate_interval": "1m", "$namespace": ".*", "$model": ".*"}
    variables |= {f"${name}": value for name, _, value in (item.partition("=") for item in args.set)}
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    end = time.time()
    start = end - args.minutes * 60
    figure, axes = plt.subplots(len(args.panels), 1, figsize=(9, 2.6 * len(args.panels)), squeeze=False)
    for axis, title in zip(axes[:, 0], args.panels, strict=True):
        panel = panels[title]
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            for series in query_range(args.prometheus, expr, start, end, step=max(2.0, (end - start) / 300)):
                times = [float(t) - end for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                axis.plot(times, values, label=legend(target["legendFormat"], series["metric"]))
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        axis.set_title(title, fontsize=10, loc="left")
        axis.set_ylabel({"s": "seconds", "reqps": "requests/s", "percentunit": "ratio"}.get(unit, unit), fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("seconds before the end of the e2e run", fontsize=8)
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
