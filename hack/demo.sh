#!/usr/bin/env bash
# `make demo`: the devcluster with two real nodes that run pods, where the machine allows (root, Debian's
# containerd; `make real-nodes` sets them up): one labelled as a GPU node and one as an Intel NPU node, without
# the devices themselves;
#   - the Helm chart runs the operator and the model store as pods on the real nodes;
#   - the example InferenceModel serves an (untrained) digits model, asked through its Service with `edgeloop infer`:
#     the NPU node runs the openvino flavour (OpenVINO on its CPU in the NPU's stead), the GPU node falls back to
#     the CPU, and `kubectl get im -o wide` and the variants' providers in use say so;
#   - the example FederatedRound trains it on each real node's own data, with secure aggregation, and promotes it;
#   - the model rolls to the trained version, asked again.
# Without real nodes (or with EDGELOOP_DEMO_REAL_NODES=0): the simulated kwok fleet, the CRDs, the operator as
# a local process and the example InferenceModel.
# `hack/demo.sh down` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
RUN_DIR=$("$BIN/devcluster" status 2>/dev/null | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["run_dir"])' || true)
REAL_NODES=${EDGELOOP_DEMO_REAL_NODES:-2}  # 0: kwok nodes only; otherwise a GPU- and an NPU-labelled real node

stop_operator() {
  local pid_file=$1/operator.pid
  if [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    kill "$(cat "$pid_file")" && echo "demo: operator stopped"
  fi
  rm -f "$pid_file"
}

if [[ ${1:-up} == down ]]; then
  [[ -n $RUN_DIR ]] && stop_operator "$RUN_DIR"
  exec "$BIN/devcluster" down
fi

if reason=$("$BIN/python" -c 'from devcluster import nodes; print(nodes.unavailable_reason() or "")') && [[ -n $reason ]]; then
  echo "demo: no real nodes here ($reason): kwok nodes only"
  REAL_NODES=0
fi

if [[ $REAL_NODES == 0 ]]; then
  "$BIN/devcluster" up
else
  # Real nodes only: the federated aggregator's Job could otherwise land on a simulated node.
  "$BIN/devcluster" up --nodes 0 --scale edge-real=1 --scale edge-real-npu=1
  REAL_NODES=2
fi
eval "$("$BIN/devcluster" env)"
RUN_DIR=$("$BIN/devcluster" status | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["run_dir"])')

show_model() {  # its printer columns, wide (ACCELERATED: whether every accelerator variant uses its accelerator)
  echo
  kubectl get inferencemodels -o wide
}

show_providers() {  # per variant (accelerator class): its nodes, and the providers its runtime reports it uses
  echo
  printf 'VARIANT\tNODES\tPROVIDERS IN USE (the node whose runtime reported them)\n'
  kubectl get inferencemodel digits -o jsonpath='{range .status.variants[*]}{.accelerator}{"\t"}{.ready}/{.desired}'\
'{"\t"}{.providersInUse}{" ("}{.providersReportedBy}{")\n"}{end}'
}

if [[ $REAL_NODES == 0 ]]; then
  kubectl apply --server-side -f crds/
  kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null
  if ! { [[ -f $RUN_DIR/operator.pid ]] && kill -0 "$(cat "$RUN_DIR/operator.pid")" 2>/dev/null; }; then
    port=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    nohup "$BIN/edgeloop" operator --all-namespaces --liveness "http://127.0.0.1:$port/healthz" \
      >"$RUN_DIR/logs/operator.log" 2>&1 &
    echo $! >"$RUN_DIR/operator.pid"
    echo "demo: operator started (pid $!, log $RUN_DIR/logs/operator.log)"
  fi
  kubectl apply -f examples/inferencemodel-digits.yaml
  echo "demo: waiting for the InferenceModel to be Ready on every node"
  kubectl wait --for=condition=Ready inferencemodel/digits --timeout=120s >/dev/null
  echo
  kubectl get nodes -L edgeloop.io/accelerator.gpu,edgeloop.io/accelerator.npu
  echo
  kubectl get daemonsets,pods -l app.kubernetes.io/managed-by=edgeloop -o wide
  show_model
  echo "(kwok runs no container, so no runtime reports what it runs on: ACCELERATED stays NotSampled)"
  cat <<MSG

The devcluster and the operator stay up. Use them with:  eval "\$($BIN/devcluster env)"
Stop both with:                                        make demo-down
MSG
  exit 0
fi

NS=edgeloop-system
mapfile -t NODE_DIRS < <("$BIN/devcluster" status | "$BIN/python" -c \
  'import json,sys; [print(n["host_path"]) for n in json.load(sys.stdin)["real_nodes"]]')
for dir in "${NODE_DIRS[@]}"; do  # as a node's provisioning would (docs/inferencemodel.md, "Node contract")
  chown 65532:65532 "$dir/models" && chmod 2775 "$dir/models"
done
echo "demo: installing the Helm chart: the operator and the model store run as pods on the real nodes"
# The GPU-labelled node has no GPU: its ONNX Runtime falls back to CPU, allowed here; and the cuda flavour is
# not built by `make images` (1.5 GB of wheels), so the gpu class runs the cpu image. The NPU-labelled node has
# no NPU: OpenVINO runs on its CPU instead (device_type CPU).
# The store keeps its blobs on a PVC of the default StorageClass, k3s's local-path, as on k3s.
RUNTIME_IMAGE=$("$BIN/python" -c 'from edgeloop import config; print(config.build().runtime_image)')
helm upgrade --install edgeloop charts/edgeloop --namespace "$NS" --create-namespace \
  --set operator.replicas=1 \
  --set 'workloadNamespaces={default}' \
  --set config.acceleratorClasses.gpu.allowCpuFallback=true --set "config.acceleratorClasses.gpu.image=$RUNTIME_IMAGE" \
  --set config.acceleratorClasses.npu.providerOptions.OpenVINOExecutionProvider.device_type=CPU \
  --wait --timeout 300s >/dev/null
kubectl get pods,pvc -n "$NS" -o wide

# The host reaches Services through the first real node's kube-proxy, as a node would.
STORE="http://$(kubectl get service edgeloop-store -n "$NS" -o jsonpath='{.spec.clusterIP}'):8000"
TOKEN=$(kubectl get secret edgeloop-store-token -n "$NS" -o jsonpath='{.data.token}' | base64 -d)
SHA=$("$BIN/python" hack/demo_data.py model "$STORE" "$TOKEN")
# The FederatedRound's dataset `digits` is <datasetRoot>/<its namespace>/digits on each node.
"$BIN/python" hack/demo_data.py datasets "${NODE_DIRS[@]/%//data/default/digits}"
echo "demo: model version 1 (sha256 ${SHA:0:12}…) is in the store; each real node holds its share of the digits data"

"$BIN/python" - "$SHA" <<'PY' | kubectl apply -f -
import json, sys, yaml
model = yaml.safe_load(open("examples/inferencemodel-digits.yaml"))
sha = sys.argv[1]
model["spec"]["model"] = {"uri": f"http://edgeloop-store.edgeloop-system.svc:8000/sha256/{sha}", "sha256": sha, "version": "1"}
print(json.dumps(model))
PY

wait_model() {  # until InferenceModel digits is Ready with the given sha256 and its runtimes said what they use
  for _ in $(seq 300); do
    read -r sha ready accelerated < <(kubectl get inferencemodel digits -o jsonpath='{.status.model.sha256} '\
'{.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Accelerated")].reason}{"\n"}') || true
    [[ $ready == True && $sha == "$1" && $accelerated != NotSampled ]] && return 0
    sleep 1
  done
  echo "demo: InferenceModel digits did not become Ready with ${1:0:12}…" >&2
  kubectl describe inferencemodel digits >&2
  return 1
}

ask() {  # `edgeloop infer` through the model's Service, verifying its TLS certificate
  kubectl get secret digits-tls -o jsonpath='{.data.ca\.crt}' | base64 -d >"$RUN_DIR/digits-ca.crt"
  "$BIN/python" hack/demo_data.py sample "$RUN_DIR/sample.npy" >/dev/null
  "$BIN/edgeloop" infer --protocol grpc --url "$(kubectl get service digits -o jsonpath='{.spec.clusterIP}'):8001" \
    --ssl --ca-cert "$RUN_DIR/digits-ca.crt" --tls-server-name digits.default.svc \
    --model digits --input "$RUN_DIR/sample.npy" >"$RUN_DIR/answer.json"
  echo "  edgeloop infer answered: $(head -c 160 "$RUN_DIR/answer.json")…"
  "$BIN/python" hack/demo_data.py predictions "$RUN_DIR/answer.json"
}

echo "demo: waiting for the InferenceModel to be Ready on every node"
wait_model "$SHA"
show_model
show_providers
echo
echo "demo: version 1, untrained, asked about 8 digits:"
ask

echo
echo "demo: a FederatedRound trains it on the real nodes' own data (secure aggregation), then promotes it"
"$BIN/python" - "$REAL_NODES" <<'PY' | kubectl apply -f -
import json, sys, yaml
round_ = yaml.safe_load(open("examples/federatedround-digits.yaml"))
clients = int(sys.argv[1])
round_["spec"]["participants"] = {"nodeSelector": {"kubernetes.io/os": "linux"},  # every real node
                                  "minClients": clients, "maxClients": clients}
round_["spec"]["training"]["rounds"] = 5
round_["spec"]["promote"]["minAccuracy"] = 0.8
print(json.dumps(round_))
PY
kubectl wait --for=condition=Promoted federatedround/digits-round-1 --timeout=600s >/dev/null \
  || { kubectl describe federatedround digits-round-1; exit 1; }
kubectl get federatedround digits-round-1
TRAINED=$(kubectl get federatedround digits-round-1 -o jsonpath='{.status.result.sha256}')
echo "demo: rolling the model to version 2 (sha256 ${TRAINED:0:12}…)"
wait_model "$TRAINED"
show_model
show_providers
echo
echo "demo: version 2, trained on the nodes, asked about the same 8 digits:"
ask

cat <<MSG

The devcluster, its real nodes and the chart's release stay up. Use them with:  eval "\$($BIN/devcluster env)"
Stop it all with:                                                            make demo-down
MSG
