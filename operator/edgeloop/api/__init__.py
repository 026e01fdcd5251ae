"""The custom resources' API: pydantic models of each CRD's spec and status.

These models are the one source of truth for the schema: `python -m edgeloop.crdgen` turns them into
the CRD YAML under crds/, and the operator parses what it reads from the cluster with them. This package
imports pydantic only, so that every other part may depend on it.
"""

GROUP = "edgeloop.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
