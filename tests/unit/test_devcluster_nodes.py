"""Real nodes' configuration: addresses, the containerd/kubelet/kube-proxy/CNI files, the images index."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import yaml
from devcluster.errors import ClusterError
from devcluster.nodes import Network, RealNode, _toml, commands, load_images, write_node_config

from devcluster import pki


def test_network_slots_do_not_overlap():
    first, second = Network(0), Network(1)
    assert (first.gateway, first.node_ip(0), first.node_pod_cidr(1)) == ("10.210.0.1", "10.210.0.10", "10.224.1.0/24")
    assert (second.service_cidr, second.service_ip, second.dns_ip) == ("10.97.0.0/16", "10.97.0.1", "10.97.0.10")
    assert len({first.bridge, second.bridge, first.netns(0), second.netns(0)}) == 4


def test_toml_subset_is_valid_toml():
    table = {"version": 2, "grpc": {"address": "/s.sock"},
             "plugins": {"io.containerd.grpc.v1.cri": {"restrict_oom_score_adj": True, "x": {"y": "z"}}}}
    assert tomllib.loads(_toml(table)) == table


def test_node_files_point_at_the_node_and_its_network(tmp_path):
    pki.write_pki(tmp_path / "pki", service_ip="10.96.0.1", extra_ips=["10.210.0.1"])
    node = RealNode("edge-real-1", 1, Network(0), tmp_path)
    write_node_config(node, tmp_path / "pki", "https://10.210.0.1:6443", "localhost/edgeloop/pause:3.10.1")

    containerd = tomllib.loads((node.dir / "containerd.toml").read_text())
    cri = containerd["plugins"]["io.containerd.grpc.v1.cri"]
    assert containerd["grpc"]["address"] == str(node.socket)
    assert cri["sandbox_image"] == "localhost/edgeloop/pause:3.10.1"
    assert set(cri["containerd"]["runtimes"]) == {"runc", "nvidia"}, "the nvidia RuntimeClass has a handler"
    cni = json.loads((node.dir / "cni/net.d/10-edgeloop.conflist").read_text())
    assert cni["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.224.1.0/24"}]]
    kubelet = yaml.safe_load((node.dir / "kubelet.yaml").read_text())
    assert (kubelet["address"], kubelet["clusterDNS"], kubelet["cgroupDriver"]) == ("10.210.0.11", ["10.96.0.10"],
                                                                                     "cgroupfs")
    kube_proxy = yaml.safe_load((node.dir / "kube-proxy.yaml").read_text())
    assert (kube_proxy["mode"], kube_proxy["hostnameOverride"]) == ("iptables", "edge-real-1")
    kubeconfig = yaml.safe_load((node.dir / "kubelet.kubeconfig").read_text())
    assert kubeconfig["clusters"][0]["cluster"]["server"] == "https://10.210.0.1:6443"
    assert not (node.dir / "pki/ca.key").exists(), "a node holds no CA key"

    argv = commands(node, tmp_path / "bin", {"edgeloop.io/accelerator.gpu": "true"},
                    [{"key": "edge", "value": "", "effect": "NoSchedule"}])
    assert "--node-labels=edgeloop.io/accelerator.gpu=true" in argv["kubelet"]
    assert "--register-with-taints=edge=:NoSchedule" in argv["kubelet"]
    assert node.enter()[:2] == ["nsenter", "--net=/run/netns/edgeloop0-n1"]


def test_images_index_needs_the_archives_and_a_pause_image(tmp_path):
    with pytest.raises(ClusterError, match="make images"):
        load_images(tmp_path / "missing.json")
    archive = tmp_path / "runtime.tar"
    archive.write_bytes(b"")
    index = tmp_path / "images.json"
    entries = [{"name": "operator", "ref": "o:1", "archive": str(archive)}]
    index.write_text(json.dumps({"images": entries}))
    with pytest.raises(ClusterError, match="no 'pause' image"):
        load_images(index)
    pause = tmp_path / "pause.tar"
    pause.write_bytes(b"")
    entries.append({"name": "pause", "ref": "p:3", "archive": str(pause)})
    index.write_text(json.dumps({"images": entries}))
    images = load_images(index)
    assert (images.sandbox, images.helper, images.archives) == ("p:3", "o:1", [archive, pause])
    entries.append({"name": "helper", "ref": "h:1", "archive": str(pause)})
    index.write_text(json.dumps({"images": entries}))
    assert load_images(index).helper == "h:1", "the Debian base when the index lists it"
    index.write_text(json.dumps({"images": entries[1:2]}))
    with pytest.raises(ClusterError, match="no 'helper' or 'operator' image"):
        load_images(index)


def test_with_real_nodes_the_apiserver_serves_on_the_gateway_with_endpoints(tmp_path):
    from devcluster.cluster import component_commands

    ports = dict.fromkeys(("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"), 1)
    simulated = component_commands(tmp_path, tmp_path, ports)["kube-apiserver"]
    real = component_commands(tmp_path, tmp_path, ports, Network(1))["kube-apiserver"]
    assert {"--bind-address=127.0.0.1", "--endpoint-reconciler-type=none"} <= set(simulated)
    assert {"--bind-address=10.210.1.1", "--advertise-address=10.210.1.1", "--endpoint-reconciler-type=lease",
            "--service-cluster-ip-range=10.97.0.0/16"} <= set(real)


def test_kwok_plays_the_offline_stage_on_the_annotation_offline_sets_and_answers_with_its_token():
    from devcluster.cluster import KWOK_EDGE_STAGES, component_commands

    from devcluster import offline

    stages = {stage["metadata"]["name"]: stage for stage in yaml.safe_load_all(KWOK_EDGE_STAGES.read_text())}
    node_offline = stages["node-offline"]["spec"]
    assert node_offline["selector"]["matchExpressions"] == [
        {"key": f'.metadata.annotations["{offline.OFFLINE}"]', "operator": "Exists"}]
    assert node_offline["weight"] > 0, "it must win over kwok's default node stages (weight 0)"
    template = node_offline["next"]["patches"][0]["template"]
    assert offline.OFFLINE_ACK in template and f'"{offline.OFFLINE}"' in template
    frozen = stages["pod-on-offline-node"]["spec"]
    assert frozen["selector"] == node_offline["selector"] and frozen["weight"] > 0 and frozen["next"] == {}, \
        "an offline node's pods: no stage of kwok's plays on them"
    # kwok loads its default stages and these; the controller-manager marks a silent node after 30 s.
    ports = dict.fromkeys(("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"), 1)
    commands = component_commands(Path("/bin-dir"), Path("/run-dir"), ports)
    assert f"--config={KWOK_EDGE_STAGES}" in commands["kwok"]
    assert "--config=/bin-dir/kwok-stages.yaml" in commands["kwok"]
    assert "--node-monitor-grace-period=30s" in commands["kube-controller-manager"]


def test_a_partition_drops_only_the_traffic_between_the_node_and_the_apiserver():
    from devcluster import offline

    rules = [" ".join(rule) for rule in offline.partition_rules("10.210.3.1", 36443)]
    assert rules == [
        "-d 10.210.3.1 -p tcp --dport 36443 -j DROP",  # the kubelet, kube-proxy and pods (kubernetes Service)
        "-s 10.210.3.1 -p tcp --sport 36443 -j DROP",
        "-s 10.210.3.1 -p tcp --dport 10250 -j DROP",  # the apiserver's calls to the kubelet (logs, exec)
    ], "the host's and other nodes' traffic to the node's pods (and its DNS) keeps flowing"


def test_pods_are_described_to_file_sd_as_kubernetes_sd_would():
    from devcluster.prometheus import pod_targets

    pod = {
        "metadata": {"namespace": "models", "name": "digits-gpu-x", "uid": "u",
                     "labels": {"app.kubernetes.io/name": "digits"}, "annotations": {"prometheus.io/scrape": "true"}},
        "spec": {"nodeName": "edge-real-0",
                 "containers": [{"name": "runtime", "ports": [{"name": "http", "containerPort": 8000},
                                                              {"name": "grpc", "containerPort": 8001}]}]},
        "status": {"podIP": "10.224.0.5", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    pending = {"metadata": {"namespace": "models", "name": "p"}, "spec": {"containers": [{"name": "c"}]},
               "status": {"phase": "Pending"}}
    no_ports = {**pod, "spec": {"nodeName": "edge-real-1", "containers": [{"name": "runtime"}]}}
    groups = pod_targets([pod, pending, no_ports])
    assert [group["targets"] for group in groups] == [["10.224.0.5:8000"], ["10.224.0.5:8001"], ["10.224.0.5"]]
    labels = groups[0]["labels"]
    assert labels["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] == "true"
    assert labels["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == "digits"
    assert (labels["__meta_kubernetes_pod_node_name"], labels["__meta_kubernetes_pod_ready"]) == ("edge-real-0", "true")
    assert (labels["__meta_kubernetes_pod_container_port_name"], groups[1]["labels"][
        "__meta_kubernetes_pod_container_port_number"]) == ("http", "8001")
    assert "__meta_kubernetes_pod_container_port_number" not in groups[2]["labels"]
