"""Devcluster figures: warm `up` until every node is Ready, idle RSS of the control plane, and the time
for a 1000-node kwok fleet to become Ready. With --cold-build, also the cold build time (an empty Go
build cache and binary cache; the Go module cache is kept, since downloads measure the network).

    python bench/devcluster_bench.py [--cold-build] [--nodes 1000] [--idle-seconds 30]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devcluster.fleet import load_fleet

from devcluster import build, cluster


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cold_build_seconds() -> float:
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "GOCACHE": f"{scratch}/go-build", "EDGELOOP_CACHE": f"{scratch}/edgeloop"}
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "devcluster.cli", "build"], env=env, check=True)
        return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold-build", action="store_true")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()

    rows: list[tuple[str, str]] = []
    if args.cold_build:
        rows.append(("cold build (7 components)", f"{cold_build_seconds():.0f} s"))

    bin_dir = build.build()
    target = cluster.Cluster.named("bench")
    with target.locked():
        cluster.down(target)
        started = time.monotonic()
        cluster.up(target, bin_dir, load_fleet())
        rows.append(("warm up, 6 nodes Ready", f"{time.monotonic() - started:.1f} s"))
        try:
            time.sleep(args.idle_seconds)
            processes = target.state()["processes"]
            per_component = {p["name"]: rss_mib(p["pid"]) for p in processes}
            for name, mib in per_component.items():
                rows.append((f"  idle RSS {name}", f"{mib:.0f} MiB"))
            rows.append((f"idle RSS, control plane + kwok, after {args.idle_seconds:.0f} s",
                         f"{sum(per_component.values()):.0f} MiB"))

            started = time.monotonic()
            cluster.ensure_fleet(target, load_fleet().scaled_to(args.nodes), timeout=900)
            rows.append((f"{args.nodes} kwok nodes Ready (from 6)", f"{time.monotonic() - started:.1f} s"))
            per_component = {p["name"]: rss_mib(p["pid"]) for p in processes}
            rows.append((f"RSS with {args.nodes} nodes", f"{sum(per_component.values()):.0f} MiB"))
        finally:
            cluster.down(target)

    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
