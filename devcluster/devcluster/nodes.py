"""Real nodes: a kubelet, kube-proxy and containerd per node, running pods for real.

Each real node gets a network namespace (one veth into a host bridge, the cluster's private network) and a
mount namespace of its own, in which the node's directory is bind-mounted on /var/lib/edgeloop: the node
contract's model cache and data paths are the node's own, as on a fleet of separate machines. The
apiserver and CoreDNS serve on the bridge's gateway address, which only the host and its nodes can reach.

Addresses of a cluster on network slot k (one slot per cluster with real nodes):
  bridge 10.210.k.0/24 (gateway .1, node i at .10+i), pods 10.(224+k).i.0/24 on node i,
  Services 10.(96+k).0.0/16 (the `kubernetes` Service .0.1, cluster DNS .0.10).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from devcluster import pki
from devcluster.errors import ClusterError

CNI_BIN_DIR = Path("/usr/lib/cni")
MANIFESTS = Path(__file__).parent / "manifests"
HOST_PATH = Path("/var/lib/edgeloop")  # the node contract's root; each node mounts its own directory here
# k3s's local-path storage (see manifests/local-path.yaml) too: each node's volumes are its own.
NODE_PRIVATE_DIRS = ("/var/log/pods", "/var/log/containers", "/var/lib/cni", "/var/lib/rancher/k3s/storage")
RUNTIME_UID = 65532  # the runtime image's user: it writes the model cache
CLUSTER_DOMAIN = "cluster.local"
# What a real node needs on the host (Debian: containerd runc containernetworking-plugins iptables conntrack).
HOST_COMMANDS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "iptables", "conntrack", "nsenter",
                 "unshare", "mount")


def unavailable_reason() -> str | None:
    """Why this machine cannot run real nodes, or None if it can."""
    if os.geteuid() != 0:
        return "real nodes need root (network and mount namespaces, cgroups, containerd)"
    missing = [name for name in HOST_COMMANDS if shutil.which(name) is None]
    if missing:
        return f"real nodes need {', '.join(missing)} (Debian: apt-get install containerd runc " \
               "containernetworking-plugins iptables conntrack)"
    if not (CNI_BIN_DIR / "bridge").exists():
        return f"real nodes need the CNI plugins in {CNI_BIN_DIR} (Debian: containernetworking-plugins)"
    if not Path("/sys/fs/cgroup/memory").is_dir():
        return "real nodes are configured for cgroup v1 (no /sys/fs/cgroup/memory here)"
    return None


@dataclass(frozen=True)
class Network:
    slot: int

    @property
    def bridge(self) -> str:
        return f"edgeloop{self.slot}"

    @property
    def gateway(self) -> str:
        return f"10.210.{self.slot}.1"

    @property
    def service_cidr(self) -> str:
        return f"10.{96 + self.slot}.0.0/16"

    @property
    def service_ip(self) -> str:
        return f"10.{96 + self.slot}.0.1"

    @property
    def dns_ip(self) -> str:
        return f"10.{96 + self.slot}.0.10"

    @property
    def pod_cidr(self) -> str:
        return f"10.{224 + self.slot}.0.0/16"

    def node_ip(self, index: int) -> str:
        return f"10.210.{self.slot}.{10 + index}"

    def node_pod_cidr(self, index: int) -> str:
        return f"10.{224 + self.slot}.{index}.0/24"

    def netns(self, index: int) -> str:
        return f"{self.bridge}-n{index}"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result


def _in_netns(netns: str, *argv: str) -> subprocess.CompletedProcess:
    return _run("ip", "netns", "exec", netns, *argv)


def allocate_network() -> Network:
    """The first slot whose bridge does not exist (slots 0-15)."""
    for slot in range(16):
        if not Path(f"/sys/class/net/edgeloop{slot}").exists():
            return Network(slot)
    raise ClusterError("all 16 devcluster networks are in use; `devcluster down` a cluster first")


def setup_bridge(network: Network) -> None:
    _run("ip", "link", "add", network.bridge, "type", "bridge")
    _run("ip", "addr", "add", f"{network.gateway}/24", "dev", network.bridge)
    _run("ip", "link", "set", network.bridge, "up")
    # The host reaches Services as a node would: through the first node, whose kube-proxy routes them.
    _run("ip", "route", "replace", network.service_cidr, "via", network.node_ip(0))
    # The host forwards between the nodes' veths; br_netfilter lets kube-proxy's rules see bridged traffic.
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    with contextlib.suppress(FileNotFoundError):
        Path("/proc/sys/net/bridge/bridge-nf-call-iptables").write_text("1")


def teardown(network: Network, node_count: int, run_dir: Path) -> None:
    """Remove what setup_bridge and setup_namespaces made; harmless for parts that are already gone."""
    for index in range(node_count):
        kill_pods(network, index, run_dir)
        _run("umount", "-l", str(mount_ns_path(run_dir, index)), check=False)
        _run("ip", "netns", "delete", network.netns(index), check=False)
        _run("ip", "route", "delete", network.node_pod_cidr(index), check=False)
    _run("umount", "-l", str(run_dir / "ns"), check=False)
    _run("ip", "route", "delete", network.service_cidr, check=False)
    _run("ip", "link", "delete", network.bridge, check=False)


def _cgroup_root(network: Network, index: int) -> str:
    return f"/{network.bridge}-n{index}"


def _cgroup_dirs(network: Network, index: int) -> list[Path]:
    """The node's cgroup root in every cgroup v1 hierarchy."""
    return [hierarchy / _cgroup_root(network, index).lstrip("/") for hierarchy in Path("/sys/fs/cgroup").iterdir()
            if hierarchy.is_dir() and not hierarchy.is_symlink() and hierarchy.name != "unified"]


def create_cgroup_root(network: Network, index: int) -> None:
    """The kubelet puts its pods under its cgroupRoot, which must exist in every hierarchy."""
    for directory in _cgroup_dirs(network, index):
        directory.mkdir(exist_ok=True)
        if directory.parent.name == "cpuset":  # a cpuset cgroup takes no tasks until it has cpus and mems
            for name in ("cpuset.cpus", "cpuset.mems"):
                (directory / name).write_text((directory.parent / name).read_text())


def _cgroup_pids(root: Path) -> set[int]:
    pids = set()
    for procs in root.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids.update(int(pid) for pid in procs.read_text().split())
    return pids


def kill_pods(network: Network, index: int, run_dir: Path) -> None:
    """Kill the node's containers and their shims (which outlive containerd by design), then remove the
    node's cgroups."""
    socket = str(node_dir(run_dir, index) / "containerd.sock")
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"containerd-shim-runc-v2") and socket.encode() in argv:
                os.kill(int(proc.name), signal.SIGKILL)
    roots = [root for root in _cgroup_dirs(network, index) if root.is_dir()]
    for pid in {pid for root in roots for pid in _cgroup_pids(root)}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5  # a killed process leaves its cgroups a moment later
    while any(_cgroup_pids(root) for root in roots) and time.monotonic() < deadline:
        time.sleep(0.05)
    for root in roots:
        for directory in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


@dataclass(frozen=True)
class RealNode:
    """One real node: where its files live and how to reach it."""

    name: str
    index: int
    network: Network
    run_dir: Path

    @property
    def dir(self) -> Path:
        return node_dir(self.run_dir, self.index)

    @property
    def host_path(self) -> Path:
        return host_path(self.run_dir, self.index)

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def mount_ns(self) -> Path:
        return mount_ns_path(self.run_dir, self.index)

    @property
    def ip(self) -> str:
        return self.network.node_ip(self.index)

    def enter(self) -> list[str]:
        """The command prefix that runs a program on this node (its network and mount namespaces)."""
        return ["nsenter", f"--net=/run/netns/{self.network.netns(self.index)}", f"--mount={self.mount_ns}", "--"]


def node_dir(run_dir: Path, index: int) -> Path:
    """Real node `index`'s files: certificates, configuration, containerd's and the kubelet's state."""
    return run_dir / "nodes" / f"n{index}"


def host_path(run_dir: Path, index: int) -> Path:
    """What real node `index` sees as /var/lib/edgeloop (its model cache and datasets)."""
    return node_dir(run_dir, index) / "edgeloop"


def mount_ns_path(run_dir: Path, index: int) -> Path:
    """The nsfs bind mount that keeps real node `index`'s mount namespace alive."""
    return run_dir / "ns" / f"n{index}.mnt"


def setup_namespaces(node: RealNode) -> None:
    network, index = node.network, node.index
    netns, host_veth, node_veth = network.netns(index), f"{network.bridge}h{index}", f"{network.bridge}n{index}"
    _run("ip", "netns", "add", netns)
    _run("ip", "link", "add", host_veth, "type", "veth", "peer", "name", node_veth)
    _run("ip", "link", "set", node_veth, "netns", netns)
    _run("ip", "link", "set", host_veth, "master", network.bridge, "up")
    _in_netns(netns, "ip", "link", "set", node_veth, "name", "eth0")
    _in_netns(netns, "ip", "addr", "add", f"{node.ip}/24", "dev", "eth0")
    _in_netns(netns, "ip", "link", "set", "eth0", "up")
    _in_netns(netns, "ip", "link", "set", "lo", "up")
    _in_netns(netns, "ip", "route", "add", "default", "via", network.gateway)
    for sysctl in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
        _in_netns(netns, "sh", "-c", f"echo 1 > /proc/sys/{sysctl}")
    create_cgroup_root(network, index)
    # Other nodes' pods are reached through their node (the pods' own traffic leaves masqueraded).
    _run("ip", "route", "replace", network.node_pod_cidr(index), "via", node.ip)

    # A persistent mount namespace (a bind mount of its nsfs file) needs a privately mounted parent.
    ns_dir = node.mount_ns.parent
    ns_dir.mkdir(exist_ok=True)
    if not _is_mountpoint(ns_dir):
        _run("mount", "--bind", str(ns_dir), str(ns_dir))
        _run("mount", "--make-private", str(ns_dir))
    node.mount_ns.touch()
    _run("unshare", f"--mount={node.mount_ns}", "--propagation", "slave", "true")
    # As a node's provisioning would: the model cache (and a hostPath store's directory) writable by the
    # runtime's user, the datasets' root readable by all. A kubelet-created hostPath would be root's. The model
    # cache is group-writable with the setgid bit, so that the directory the kubelet makes in it for each
    # namespace (a subPath) is the runtime's group's and writable by it.
    for sub, owner, mode in (("models", RUNTIME_UID, 0o2775), ("store", RUNTIME_UID, 0o755), ("data", 0, 0o755)):
        (node.host_path / sub).mkdir(parents=True, exist_ok=True)
        os.chown(node.host_path / sub, owner, owner)
        os.chmod(node.host_path / sub, mode)
    # Host paths that the kubelet and the CNI plugins share between nodes unless each has its own: a kubelet
    # deletes the pod logs of pods it does not know.
    for host_dir, own in ((HOST_PATH, node.host_path), *((Path(p), node.dir / "mounts" / Path(p).name)
                                                         for p in NODE_PRIVATE_DIRS)):
        own.mkdir(parents=True, exist_ok=True)
        host_dir.mkdir(parents=True, exist_ok=True)  # the mount point; the host's own stays as it was
        _run("nsenter", f"--mount={node.mount_ns}", "--", "mount", "--bind", str(own), str(host_dir))


def _is_mountpoint(path: Path) -> bool:
    return _run("mountpoint", "-q", str(path), check=False).returncode == 0


# ---------------------------------------------------------------------------------------------
# configuration files


def write_node_config(node: RealNode, pki_dir: Path, apiserver: str, sandbox_image: str) -> None:
    """Certificates, kubeconfigs and the config files of containerd, the CNI, the kubelet and kube-proxy."""
    network, directory = node.network, node.dir
    for sub in ("containerd/root", "containerd/state", "cni/net.d", "cni/ipam", "kubelet", "pki"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    node_pki = directory / "pki"
    shutil.copy(pki_dir / "ca.crt", node_pki / "ca.crt")
    shutil.copy(pki_dir / "ca.key", node_pki / "ca.key")
    pki.issue_client(node_pki, "kubelet", f"system:node:{node.name}", ["system:nodes"])
    pki.issue_server(node_pki, "kubelet-serving", f"system:node:{node.name}", [node.name], [node.ip])
    pki.issue_client(node_pki, "kube-proxy", "system:kube-proxy")
    (node_pki / "ca.key").unlink()  # a node holds no CA key
    for client in ("kubelet", "kube-proxy"):
        pki.write_kubeconfig(directory / f"{client}.kubeconfig", apiserver, node_pki, client)

    runtime = {"runtime_type": "io.containerd.runc.v2", "options": {"SystemdCgroup": False}}
    containerd = {
        "version": 2,
        "root": str(directory / "containerd/root"),
        "state": str(directory / "containerd/state"),
        "grpc": {"address": str(node.socket)},
        "plugins": {
            "io.containerd.grpc.v1.cri": {
                "sandbox_image": sandbox_image,
                # Without CAP_SYS_RESOURCE (as here) nothing may lower its OOM score below containerd's own;
                # clamp the kubelet's negative scores (the pause sandbox's -998) instead of failing every pod.
                "restrict_oom_score_adj": True,
                # Pods' network namespaces under the node's state, not the host's /run/netns.
                "netns_mounts_under_state_dir": True,
                "containerd": {
                    "snapshotter": "overlayfs",
                    "default_runtime_name": "runc",
                    # `nvidia` as k3s registers it on GPU nodes; here it is plain runc (the node has no GPU).
                    "runtimes": {"runc": runtime, "nvidia": runtime},
                },
                "cni": {"bin_dir": str(CNI_BIN_DIR), "conf_dir": str(directory / "cni/net.d")},
            },
        },
    }
    (directory / "containerd.toml").write_text(_toml(containerd))

    cni = {
        "cniVersion": "1.0.0",
        "name": "edgeloop",
        "plugins": [
            {
                "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "hairpinMode": True,
                "ipam": {
                    "type": "host-local", "ranges": [[{"subnet": network.node_pod_cidr(node.index)}]],
                    "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(directory / "cni/ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (directory / "cni/net.d/10-edgeloop.conflist").write_text(json.dumps(cni, indent=2))

    (directory / "resolv.conf").write_text("")  # no upstream DNS: pods resolve through the cluster DNS only
    kubelet = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.ip,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "authentication": {
            "anonymous": {"enabled": False}, "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(node_pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(node_pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(node_pki / "kubelet-serving.key"),
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": _cgroup_root(network, node.index),
        "failCgroupV1": False,
        "failSwapOn": False,
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [network.dns_ip],
        "resolvConf": str(directory / "resolv.conf"),
        # Images come from `make images`, not a registry: never garbage-collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
        "serializeImagePulls": False,
    }
    (directory / "kubelet.yaml").write_text(yaml.safe_dump(kubelet, sort_keys=False))

    kube_proxy = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(directory / "kube-proxy.kubeconfig")},
        "hostnameOverride": node.name,
        "clusterCIDR": network.pod_cidr,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # Leave the host's conntrack table sizes alone (they are not per network namespace).
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }
    (directory / "kube-proxy.yaml").write_text(yaml.safe_dump(kube_proxy, sort_keys=False))


def _toml(table: dict, prefix: str = "") -> str:
    """The small subset of TOML containerd's config needs: scalars and nested tables."""
    def scalar(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return json.dumps(value)

    lines = [f"{key} = {scalar(value)}" for key, value in table.items() if not isinstance(value, dict)]
    for key, value in table.items():
        if isinstance(value, dict):
            name = f'{prefix}.{json.dumps(key) if "." in key else key}'.lstrip(".")
            lines += ["", f"[{name}]", _toml(value, name)]
    return "\n".join(lines).strip() + "\n"


def commands(node: RealNode, bin_dir: Path, labels: dict[str, str], taints: list[dict]) -> dict[str, list[str]]:
    """The node's daemons, in start order, each run inside the node's namespaces (see RealNode.enter)."""
    directory = node.dir
    taint_list = ",".join(f"{taint['key']}={taint['value']}:{taint['effect']}" for taint in taints)
    return {
        "containerd": ["containerd", f"--config={directory / 'containerd.toml'}", "--log-level=warn"],
        "kubelet": [
            str(bin_dir / "kubelet"), f"--config={directory / 'kubelet.yaml'}",
            f"--kubeconfig={directory / 'kubelet.kubeconfig'}", f"--root-dir={directory / 'kubelet'}",
            f"--hostname-override={node.name}", f"--node-ip={node.ip}",
            f"--node-labels={','.join(f'{k}={v}' for k, v in sorted(labels.items()))}",
            *([f"--register-with-taints={taint_list}"] if taints else []),
        ],
        "kube-proxy": [str(bin_dir / "kube-proxy"), f"--config={directory / 'kube-proxy.yaml'}"],
    }


def import_images(node: RealNode, archives: list[Path]) -> None:
    for archive in archives:
        _run(*node.enter(), "ctr", f"--address={node.socket}", "--namespace=k8s.io", "images", "import", str(archive))


# ---------------------------------------------------------------------------------------------
# images (built by `make images`; there is no registry)

IMAGES_INDEX = Path(os.environ.get("EDGELOOP_CACHE", Path.home() / ".cache" / "edgeloop")) / "images" / "images.json"
SANDBOX_IMAGE = "pause"  # the images index entry that containerd runs as every pod's sandbox
# The entries whose image may run the local-path provisioner's helper pods, the first listed: it needs a shell
# and coreutils (k3s runs busybox, which the nodes do not have; the runtime images are FROM scratch). `helper`
# is the Debian base `make images` builds; an index written before it was listed has the operator's.
HELPER_IMAGES = ("helper", "operator")


@dataclass(frozen=True)
class Images:
    archives: list[Path]
    refs: dict[str, str]  # name -> reference

    @property
    def sandbox(self) -> str:
        return self.refs[SANDBOX_IMAGE]

    @property
    def helper(self) -> str:
        return next(self.refs[name] for name in HELPER_IMAGES if name in self.refs)


def load_images(index: Path | None = None) -> Images:
    index = index or IMAGES_INDEX
    try:
        entries = json.loads(index.read_text())["images"]
    except FileNotFoundError:
        raise ClusterError(f"real nodes run locally built images, and {index} does not exist: run `make images`") \
            from None
    missing = [entry["archive"] for entry in entries if not Path(entry["archive"]).exists()]
    if missing:
        raise ClusterError(f"image archives listed in {index} are missing ({', '.join(missing)}): run `make images`")
    refs = {entry["name"]: entry["ref"] for entry in entries}
    if SANDBOX_IMAGE not in refs:
        raise ClusterError(f"{index} lists no {SANDBOX_IMAGE!r} image: run `make images`")
    if not set(HELPER_IMAGES) & set(refs):
        raise ClusterError(f"{index} lists no {' or '.join(map(repr, HELPER_IMAGES))} image: run `make images`")
    return Images([Path(entry["archive"]) for entry in entries], refs)
