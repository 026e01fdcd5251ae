"""`devcluster`: a real local Kubernetes control plane with a simulated edge fleet."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from devcluster import addons, build, cluster, nodes, offline, pin
from devcluster.fleet import load_fleet


def _cluster(args) -> cluster.Cluster:
    return cluster.Cluster.named(args.name)


def cmd_build(args) -> int:
    print(build.build(force=args.force))
    for name in addons.ADDONS:
        print(addons.build(name))
    return 0


def cmd_pin(args) -> int:
    pin.pin(args.kubernetes)
    return 0


def _group_count(text: str) -> tuple[str, int]:
    name, _, count = text.partition("=")
    if not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected GROUP=N, got {text!r}")
    return name, int(count)


def cmd_up(args) -> int:
    fleet = load_fleet(args.fleet)
    try:
        if args.nodes is not None:
            fleet = fleet.scaled_to(args.nodes)
        if args.real_nodes is not None:
            fleet = fleet.with_real_nodes(args.real_nodes)
        if args.scale:
            fleet = fleet.with_counts(dict(args.scale))
    except ValueError as error:
        raise cluster.ClusterError(str(error)) from None
    target = _cluster(args)
    with target.locked():
        cluster.up(target, build.build(), fleet, timeout=args.timeout, images=args.images)
    print(f"devcluster: kubeconfig {target.kubeconfig}")
    return 0


def cmd_down(args) -> int:
    target = _cluster(args)
    with target.locked():
        stopped = cluster.down(target)
    print("devcluster: stopped and removed" if stopped else "devcluster: nothing was running")
    return 0


def cmd_status(args) -> int:
    summary = cluster.status(_cluster(args))
    print(json.dumps(summary, indent=2))
    return 0 if summary["running"] else 1


def cmd_kubeconfig(args) -> int:
    target = _cluster(args)
    if not target.kubeconfig.exists():
        print(f"devcluster {args.name!r} is not up; run `devcluster up`", file=sys.stderr)
        return 1
    print(target.kubeconfig)
    return 0


def cmd_env(args) -> int:
    """Shell exports that point kubectl and helm at this cluster: eval "$(devcluster env)"."""
    print(f"export KUBECONFIG={_cluster(args).kubeconfig}")
    print(f'export PATH={build.bin_dir()}:"$PATH"')
    return 0


def cmd_node(args) -> int:
    offline.set_offline(_cluster(args), args.names, args.state == "offline", wait=args.wait)
    print(f"devcluster: {', '.join(args.names)} {args.state}")
    return 0


def cmd_kubectl(args) -> int:
    """Run the pinned kubectl against this cluster."""
    kubectl = str(build.bin_dir() / "kubectl")
    os.execv(kubectl, [kubectl, f"--kubeconfig={_cluster(args).kubeconfig}", *args.kubectl_args])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devcluster", description=__doc__)
    parser.add_argument("--name", default=os.environ.get("DEVCLUSTER_NAME", "default"),
                        help=f"which cluster: its run directory is {cluster.STATE_ROOT}/NAME (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="build the pinned components (cached; rebuilt only when the pin changes)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("pin", help="pin another Kubernetes release: regenerate go.mod's staging replaces")
    p.add_argument("--kubernetes", required=True, metavar="VERSION", help="e.g. v1.34.4")
    p.set_defaults(func=cmd_pin)

    p = sub.add_parser("up", help="start the control plane and the fleet; harmless when already up")
    p.add_argument("--fleet", type=Path, help="fleet spec (YAML); default: the built-in 2 NPU / 2 GPU / 2 CPU fleet")
    p.add_argument("--nodes", type=int, help="scale the simulated fleet to N nodes in all, keeping its mix of groups")
    p.add_argument("--real-nodes", type=int, metavar="N",
                   help="run N real nodes (kubelet, kube-proxy, containerd; needs root and `make images`)")
    p.add_argument("--scale", type=_group_count, action="append", metavar="GROUP=N",
                   help="set a group's count, e.g. --scale edge-real-npu=1 (a real NPU node), --scale edge-arm64=2")
    p.add_argument("--images", type=Path, metavar="FILE",
                   help=f"the images index real nodes import (default: {nodes.IMAGES_INDEX})")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every node to be Ready")
    p.set_defaults(func=cmd_up)

    sub.add_parser("down", help="stop exactly the processes `up` started and remove their state").set_defaults(
        func=cmd_down)
    sub.add_parser("status", help="print the components and nodes as JSON; exit 1 if not running").set_defaults(
        func=cmd_status)
    sub.add_parser("kubeconfig", help="print the admin kubeconfig's path").set_defaults(func=cmd_kubeconfig)
    sub.add_parser("env", help="print shell exports for KUBECONFIG and PATH").set_defaults(func=cmd_env)
    p = sub.add_parser("node", help="take nodes offline (cut off from the control plane) or bring them back")
    p.add_argument("state", choices=["offline", "online"])
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="wait until the API shows it: Ready no longer True (offline; ~30 s) or True (online)")
    p.set_defaults(func=cmd_node)
    p = sub.add_parser("kubectl", help="run the pinned kubectl against the cluster")
    p.add_argument("kubectl_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_kubectl)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except cluster.ClusterError as error:
        print(f"devcluster: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
