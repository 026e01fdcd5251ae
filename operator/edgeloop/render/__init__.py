"""Pure rendering: (spec, operator configuration) → Kubernetes manifests as plain dicts.

Templates under edgeloop/templates are YAML with every value inserted through `tojson` (JSON is YAML), so
no label, URI or selector can break the document's structure. Nothing here talks to a cluster.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import jinja2
import yaml

from edgeloop import names
from edgeloop.api import API_VERSION

# LibYAML's loader where PyYAML was built with it (the wheels are): the pure-Python one made rendering 8
# times slower, which a burst of new models feels.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("edgeloop", "templates"),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_templates.filters["tojson"] = lambda value: json.dumps(value, sort_keys=True)
_templates.globals["names"] = names


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns what is rendered for it."""

    kind: str
    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def render_template(template: str, /, **values: Any) -> dict[str, Any]:
    return yaml.load(_templates.get_template(template).render(**values), Loader=_YAML_LOADER)


def render_hash(manifest: dict[str, Any]) -> str:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def with_render_hash(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` annotated with the hash of its own content."""
    metadata = manifest["metadata"]
    annotations = {**metadata.get("annotations", {}), names.RENDER_HASH: render_hash(manifest)}
    return {**manifest, "metadata": {**metadata, "annotations": annotations}}
