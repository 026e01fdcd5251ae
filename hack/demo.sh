#!/usr/bin/env bash
# `make demo`: the devcluster with its simulated fleet, the CRDs, the operator (a local process, as the
# admin), and the example InferenceModel, then what kubectl shows. `hack/demo.sh down` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
RUN_DIR=$("$BIN/devcluster" status 2>/dev/null | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["run_dir"])' || true)

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

"$BIN/devcluster" up
eval "$("$BIN/devcluster" env)"
RUN_DIR=$("$BIN/devcluster" status | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["run_dir"])')

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
kubectl get inferencemodels
echo
kubectl get daemonsets,pods -l app.kubernetes.io/managed-by=edgeloop -o wide
echo
kubectl get inferencemodel digits -o jsonpath='{range .status.variants[*]}{.accelerator}{": "}{.ready}{"/"}{.desired}{" ready, providers "}{.executionProviders}{"\n"}{end}'
cat <<MSG

The devcluster and the operator stay up. Use them with:  eval "\$($BIN/devcluster env)"
Stop both with:                                        make demo-down
MSG
