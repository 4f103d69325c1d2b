"""Render the chart with a real Helm engine and check every object against Kubernetes JSON schemas.

Helm: the ``helm`` binary where one is on PATH, else ``helm-python-sdk`` (Helm's own Go SDK behind a C ABI).
Schemas: ``kubernetes-validate``'s strict schemas (unknown fields are errors) for built-in kinds, and the
vendored schemas in ``schemas/`` for the custom resources (RayCluster, ServiceMonitor), whose pod templates
and metadata are checked against the same Kubernetes definitions.
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

CHART = Path(__file__).resolve().parents[2] / "helm" / "kvtier"
KUBERNETES_VERSION = "1.33"
_CUSTOM_SCHEMAS = {("ray.io/v1", "RayCluster"): "raycluster-ray-v1.json",
                   ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json"}


class ChartRenderError(Exception):
    """Helm refused to render: a values.schema.json violation or a template's `fail`."""


def render(values: dict, release: str = "kv", namespace: str = "serving") -> list[dict]:
    """Every object the chart renders for ``values``, in template order."""
    texts = _render_with_binary(values, release, namespace) if shutil.which("helm") else \
        _render_with_sdk(values, release, namespace)
    objects = []
    for text in texts:
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def _render_with_binary(values: dict, release: str, namespace: str) -> list[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values_file:
        json.dump(values, values_file)
        values_file.flush()
        done = subprocess.run(["helm", "template", release, str(CHART), "--namespace", namespace,
                               "--values", values_file.name], capture_output=True, text=True)
    if done.returncode != 0:
        raise ChartRenderError(done.stderr)
    return [done.stdout]


def _render_with_sdk(values: dict, release: str, namespace: str) -> list[str]:
    import helm_python

    chart = helm_python.Chart.load(CHART)
    try:
        rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    except helm_python.HelmError as error:
        raise ChartRenderError(str(error)) from None
    return [text for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")]


@cache
def _kubernetes_definitions() -> Resource:
    version = f"v{KUBERNETES_VERSION}.0-local-strict"
    path = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / version / "_definitions.json"
    return Resource.from_contents(json.loads(path.read_text()))


def validate(obj: dict) -> None:
    """Raise (jsonschema.ValidationError, or SchemaNotFoundError for an unknown kind) unless ``obj`` is valid."""
    schema_file = _CUSTOM_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
    if schema_file is None:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        return
    schema = json.loads((Path(__file__).parent / "schemas" / schema_file).read_text())
    registry = _kubernetes_definitions() @ Registry()
    jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)
