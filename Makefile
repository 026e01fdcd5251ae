# edgeloop: `make demo` runs the main job, `make test` passes the tests. Both set themselves up.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: all venv devcluster-build crds lint unit e2e test real-nodes demo demo-down clean \
	bench-devcluster bench-serve bench-perf-analyzer bench-federated bench-store-fanout bench-operator-scale images images-cuda \
	images-host

all: test

$(VENV)/.installed: pyproject.toml runtime-image/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -e './runtime-image[cpu,tflite,federated]'
	touch $@

venv: $(VENV)/.installed

# Builds the pinned Kubernetes components from their Go modules, once per pin (cached in ~/.cache/edgeloop).
devcluster-build: venv
	$(BIN)/devcluster build

# The CRDs are generated from the pydantic API models (operator/edgeloop/api), and the Helm chart's CRDs and
# RBAC rules from the same sources (edgeloop.chartgen); unit tests fail when either is stale.
crds: venv
	$(BIN)/python -m edgeloop.crdgen --output-dir crds
	$(BIN)/python -m edgeloop.chartgen --chart-dir charts/edgeloop

lint: venv
	$(BIN)/ruff check .

unit: venv
	$(BIN)/pytest -m 'not e2e'

e2e: venv devcluster-build real-nodes
	$(BIN)/pytest -m e2e

test: venv devcluster-build lint real-nodes
	$(BIN)/pytest

# The runtime flavours (cpu, openvino, federated), operator and pause images as OCI archives in
# ~/.cache/edgeloop/images, built without a registry (debootstrap base, buildah; needs root); rebuilt only when
# their inputs change. See docs/images.md. `make images`: for amd64 and arm64, one OCI image index each (arm64's
# RUN steps run under qemu-user-static, installed and registered with binfmt_misc when missing: about 20 min);
# `make images-host`: for this machine's architecture only, what `make test` and `make demo` build.
images: venv
	$(BIN)/python images/build.py --arch amd64,arm64

images-host: venv
	$(BIN)/python images/build.py

# The CUDA flavour: ~1.5 GB of CUDA and cuDNN wheels, so not part of `make images` (nor CI).
images-cuda: venv
	$(BIN)/python images/build.py --only runtime-cuda

# Real nodes' prerequisites (root: Debian's containerd, runc, CNI plugins; the images). Without root, says so.
real-nodes: venv
	hack/real-nodes.sh

# The devcluster with its fleet and two real nodes: the chart, a model served and trained; stays up.
demo: venv devcluster-build real-nodes
	hack/demo.sh

demo-down: venv
	hack/demo.sh down

# Benchmarks print figures and ratios against peers measured in the same run; none is a test.
bench-devcluster: venv devcluster-build
	$(BIN)/python bench/devcluster_bench.py

bench-serve: venv
	$(BIN)/python bench/serve/run.py

bench-perf-analyzer: venv
	$(BIN)/python bench/perf_analyzer.py

bench-federated: venv
	$(BIN)/python bench/federated.py --rounds 10 --repeat 5

# Installs Debian's nginx with apt when missing (root).
bench-store-fanout: venv
	$(BIN)/python bench/store_fanout.py

bench-operator-scale: venv devcluster-build
	$(BIN)/python bench/operator_scale.py

clean: demo-down
	rm -rf $(VENV)
