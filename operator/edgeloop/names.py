"""The names the operator writes into the cluster and reads back: labels, annotations, containers, ports.

Templates, render, status and handlers all take them from here (templates as `names.X`), so a name
changed once changes everywhere. The prefix `edgeloop.io/` marks what edgeloop itself writes.
"""

from __future__ import annotations

# ---- labels

MANAGED_BY = {"app.kubernetes.io/managed-by": "edgeloop"}
PART_OF = "edgeloop"
RUNTIME_APP = "edgeloop-runtime"  # app.kubernetes.io/name of every pod running the runtime
INFERENCE_COMPONENT = "inference"
TRAINING_COMPONENT = "federated-training"
INFERENCE_MODEL_LABEL = "edgeloop.io/inferencemodel"
ACCELERATOR_LABEL = "edgeloop.io/accelerator"
ROUND_LABEL = "edgeloop.io/federatedround"
ROLE_LABEL = "edgeloop.io/role"
AGGREGATOR_ROLE, CLIENT_ROLE = "aggregator", "client"
# On every Secret of TLS by default ("ca", "server" or "client"): the operator watches only these.
TLS_LABEL = "edgeloop.io/tls"
# On every InferenceModel pod: the hash of the pod template it was made from. Pods whose hash is not their
# DaemonSet's current one run an older version; the operator replaces them in waves (OnDelete DaemonSets).
TEMPLATE_LABEL = "edgeloop.io/template"

# ---- annotations

# The hash of everything the operator rendered into an object; equal hashes mean nothing to apply.
RENDER_HASH = "edgeloop.io/render-hash"
# A hash of the certificate a pod template mounts: pods roll when it changes.
TLS_REVISION = "edgeloop.io/tls-revision"
# On a round's aggregator Job: the decisions taken when the round started.
START_ANNOTATION = "edgeloop.io/start"
# On a round's client Job: the node it trains on.
NODE_ANNOTATION = "edgeloop.io/node"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
# On every InferenceModel pod: the model version it serves (what status reports for offline nodes).
MODEL_VERSION_ANNOTATION = "edgeloop.io/model-version"

# ---- containers

FETCH_CONTAINER = "fetch"  # an InferenceModel pod's init container: fetches and verifies the model
RUNTIME_CONTAINER = "runtime"  # serves it
AGGREGATOR_CONTAINER = "aggregator"
CLIENT_CONTAINER = "client"

# ---- ports (named in every pod template, so Services and NetworkPolicies need no numbers)

HTTP_PORT = "http"
GRPC_PORT = "grpc"
METRICS_PORT = "metrics"  # an aggregator's plain-HTTP /metrics

# ---- volumes and where containers mount them

MODEL_CACHE_VOLUME = "model-cache"
DATA_VOLUME = "data"
TLS_VOLUME = "tls"
STORE_CA_VOLUME = "store-ca"
TMP_VOLUME = "tmp"
# A kubernetes.io/tls Secret's files (tls.crt, tls.key, ca.crt), in every pod that has one.
TLS_DIR = "/etc/edgeloop/tls"
# The model store's CA (a ConfigMap's ca.crt), where fetchers and aggregators trust it.
STORE_CA_DIR = "/etc/edgeloop/store-ca"
# In the runtime container: the namespace's compiled models on the node (<modelCacheDir>/<namespace>/compiled).
COMPILED_CACHE_DIR = "/var/lib/edgeloop/compiled"
