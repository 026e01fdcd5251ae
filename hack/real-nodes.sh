#!/usr/bin/env bash
# `make real-nodes`: what the devcluster's real nodes need on this machine, for `make test` and `make demo`:
# Debian's containerd, runc, CNI plugins, iptables and conntrack, Prometheus (the e2e tests' own, started by a
# fixture), and the images (built by buildah from a debootstrap base: images/build.py). Real nodes need root;
# without it this says so, and the real-node tests are skipped with that reason while everything else runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(containerd runc containernetworking-plugins iptables conntrack buildah debootstrap)

if [[ $(id -u) != 0 ]]; then
  echo "real nodes: not set up (they need root); their tests will be skipped, the demo runs kwok nodes only"
  exit 0
fi
missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "real nodes: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi
if ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q "install ok installed"; then
  echo "real nodes: installing Debian's prometheus (for the e2e tests; its system service is not started)"
  export DEBIAN_FRONTEND=noninteractive
  # Its package starts a system Prometheus on :9090 unless a policy-rc.d says no; the tests start their own.
  guard=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
  fi
  install=(apt-get install -y -q --no-install-recommends prometheus)
  "${install[@]}" >/dev/null || { apt-get update -q >/dev/null && "${install[@]}" >/dev/null; }
  if [[ -n $guard ]]; then rm -f /usr/sbin/policy-rc.d; fi
fi
.venv/bin/python images/build.py
