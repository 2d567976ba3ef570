"""Security checks (issue 6): credentials, API-key auth, Ray dashboard/jobs API, safe model
loading and the chart's pod security.

Everything here is cheap (no model training, no Serve): the API-key checks call the FastAPI app
in-process through raw ASGI scopes (so hostile paths reach it unnormalised), the Ray check starts
one real ``ray start --head`` on free 127.0.0.1 ports and stops only the processes it started.
The live-stack checks (no credential in a running Serve's logs, metrics or error bodies, auth
under fuzzed paths) are in tests/test_fuzz.py, which has a Serve stack running anyway; the
"no secret outside a Secret" check of the rendered chart is
tests/test_helm_chart.py::test_no_secret_outside_secrets.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import secrets
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import helm_support as hs  # noqa: E402
import ray_support  # noqa: E402

from asgi_support import asgi_request

CI_VALUES = sorted((REPO / "helm" / "ci").glob("*.yaml"))


# ------------------------------------------------------------------------------ credentials


def _bloodcnn_cli(*args: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "bloodcnn"
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "bloodcnn.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_credentials_never_in_cli_output_logs_or_errors(s3_server, s3_prefix):
    """The CLI at DEBUG level, with right and with wrong S3 credentials, never prints the secret
    key (right or wrong) or the API key; a wrong secret gives a clear error naming the problem."""
    api_key = "apikey-" + secrets.token_hex(12)
    wrong_secret = "WrOnG-" + secrets.token_urlsafe(18)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BLOODCNN", "AWS_"))}
    base.update(s3_server.env(), BLOODCNN_API_KEY=api_key, BLOODCNN_LOG_LEVEL="DEBUG",
                BLOODCNN__REGISTRY__URI=f"{s3_prefix}/models", BLOODCNN__STORAGE__MAX_ATTEMPTS="1")
    ok = _bloodcnn_cli("--log-level", "DEBUG", "models", "list", env=base)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = _bloodcnn_cli("--log-level", "DEBUG", "models", "list", env={**base, "AWS_SECRET_ACCESS_KEY": wrong_secret})
    assert bad.returncode != 0
    assert "rejected the credentials" in bad.stderr, bad.stderr[-2000:]
    for proc in (ok, bad):
        text = proc.stdout + proc.stderr
        for needle in (s3_server.secret_key, wrong_secret, api_key):
            assert needle not in text, "a credential was printed"


def test_checkpoint_filesystem_handed_to_ray_carries_no_credentials(s3_server):
    """The pyarrow S3 filesystem that Ray Train pickles to its controller and workers holds the
    endpoint only; the same object built with explicit keys would carry them (control)."""
    import pyarrow.fs

    from bloodcnn.train.job import _storage_filesystem

    path, fs = _storage_filesystem("s3://bloodcnn/runs")
    assert path == "bloodcnn/runs" and fs is not None
    blob = pickle.dumps(fs)
    assert s3_server.secret_key.encode() not in blob and s3_server.access_key.encode() not in blob
    control = pyarrow.fs.S3FileSystem(access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                                      endpoint_override=s3_server.endpoint_url.split("://")[1], scheme="http")
    assert s3_server.secret_key.encode() in pickle.dumps(control)


def test_config_and_model_metadata_hold_no_credentials(s3_server, s3_prefix, monkeypatch):
    """Credentials come from the environment only: the config dump (stored in every model's
    metadata) and the registry's files never contain them, even with the API key set."""
    from bloodcnn.config import load_config

    monkeypatch.setenv("BLOODCNN_API_KEY", "apikey-" + secrets.token_hex(8))
    cfg = load_config(overrides={"registry": {"uri": f"{s3_prefix}/models"}})
    dumped = json.dumps(cfg.model_dump())
    for needle in (s3_server.secret_key, s3_server.access_key, os.environ["BLOODCNN_API_KEY"]):
        assert needle not in dumped


# ------------------------------------------------------------------------------ API-key auth


class _FakeBackend:
    """Records every call, so a request that got past auth without a key is visible."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def predict(self, data: bytes) -> dict:
        self.calls.append("predict")
        return {"class": "Benign", "class_index": 0, "confidence": 0.9, "uncertain": False,
                "probabilities": {"Benign": 0.9, "Pro-B": 0.1}, "model_version": "v1"}

    async def explain(self, data: bytes) -> dict:
        self.calls.append("explain")
        return {"error": {"code": "not_ready", "message": "x", "status": 503}}

    async def status(self) -> dict:
        self.calls.append("status")
        return {"ready": True, "model_version": "v1"}

    async def model_info(self) -> dict:
        self.calls.append("model_info")
        return {"model_name": "bloodcnn", "version": "v1"}


def _asgi(app, method: str, path: str, headers: list[tuple[bytes, bytes]] = (), body: bytes = b"",
          root_path: str = "") -> tuple[int, bytes]:
    """One request through the ASGI app with the path exactly as given (no client normalisation)."""
    status, _, out = asgi_request(app, method, path, headers, body, root_path=root_path)
    return status, out


@pytest.fixture(scope="module")
def api_with_key():
    from serving.api import create_api
    from serving.settings import IngressSettings

    key = "key-" + secrets.token_urlsafe(16)
    backend = _FakeBackend()
    return create_api(backend, IngressSettings(), api_key=key), backend, key


HEALTH = {"/healthz", "/readyz"}
#: the web page: static files only (the page asks for the key and sends it with its API calls)
PAGE = {"/", "/index.html", "/favicon.ico"}


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "app.js", path)


def test_api_key_required_on_every_route_but_health_readiness_and_the_static_page(api_with_key):
    app, backend, key = api_with_key
    routes = sorted({(_concrete(r.path), m) for r in app.routes for m in (getattr(r, "methods", None) or {"GET"})})
    paths = {p for p, _ in routes}
    assert {"/v1/predict", "/v1/explain", "/v1/models/current", "/metrics", "/docs", "/openapi.json",
            "/v2", "/v2/health/ready"} <= paths
    extra = ["/nope", "/v1", "/v1/", "/v1/predict/", "//v1/predict", "/V1/PREDICT", "/HEALTHZ", "/healthz/",
             "/healthz/../v1/models/current", "/readyz/../metrics", "/static/../v1/models/current",
             "/static/..%2Fv1%2Fpredict", "/index.html/../metrics", "/%2e%2e/v1/predict", "/metrics;x",
             "/docs/oauth2-redirect", "/v1/models/current\x00", "/v2/models/bloodcnn/infer",
             "/v2/models/bloodcnn/versions/1/infer", "/v2/", "/V2/HEALTH/LIVE"]
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    checked = 0
    for path in sorted(paths | set(extra)):
        for method in methods:
            backend.calls.clear()
            for headers in ([], [(b"x-api-key", b"wrong")], [(b"authorization", b"Bearer wrong")],
                            [(b"authorization", b"Basic " + key.encode())], [(b"x-api-key", key[:-1].encode())],
                            [(b"x-api-key", key.encode() + b"x")], [(b"x-api-key", b"")]):
                status, body = _asgi(app, method, path, headers)
                public = path in HEALTH or path in PAGE or path.startswith("/static/")
                if public:
                    assert status != 401, (method, path)
                    assert key.encode() not in body
                else:
                    assert status == 401, (method, path, headers, status)
                    error = json.loads(body)["error"]
                    if path == "/v2" or path.startswith("/v2/"):  # the Open Inference Protocol's shape: {"error": "<message>"}
                        assert isinstance(error, str) and "API key" in error, (path, error)
                    else:
                        assert error["code"] == "unauthorized", (path, error)
                checked += 1
            # without the key, nothing but the readiness probe ever reached the model backend
            assert set(backend.calls) <= {"status"}, (method, path, backend.calls)
    assert checked > 500
    # and with the key every API route answers (not 401), by either header
    for method, path in [("GET", "/v1/models/current"), ("GET", "/metrics"), ("GET", "/docs"),
                         ("GET", "/openapi.json")]:
        for headers in ([(b"x-api-key", key.encode())], [(b"authorization", b"Bearer " + key.encode())]):
            status, _ = _asgi(app, method, path, headers)
            assert status == 200, (method, path)
    # the route prefix (Serve route_prefix -> ASGI root_path) does not open a way around the check
    status, _ = _asgi(app, "GET", "/late/v1/models/current", root_path="/late")
    assert status == 401
    status, _ = _asgi(app, "GET", "/late/healthz", root_path="/late")
    assert status == 200


def test_static_page_serves_no_data_and_no_key(api_with_key):
    """The only routes open besides health/readiness are the bundled page and its static files."""
    app, backend, key = api_with_key
    static = [r for r in app.routes if getattr(r, "path", "").startswith("/static/")]
    assert len(static) == 1
    from serving.api import STATIC_DIR, STATIC_TYPES

    names = [p.name for p in STATIC_DIR.iterdir() if p.suffix in STATIC_TYPES] if STATIC_DIR.is_dir() else []
    backend.calls.clear()
    for name in names:
        status, body = _asgi(app, "GET", f"/static/{name}")
        assert status == 200 and key.encode() not in body
    status, body = _asgi(app, "GET", "/")
    assert status == 200 and key.encode() not in body and b"AUTH_REQUIRED" not in body
    assert backend.calls == []


# ------------------------------------------------------------------------------ Ray dashboard / jobs API


def _listening(port: int) -> set[str]:
    """Addresses listening on ``port`` (from /proc/net/tcp{,6}), as hex strings."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, hexport = parts[1].rsplit(":", 1)
            if parts[3] == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.fixture(scope="module")
def ray_head():
    """A head with token auth and Ray's default --dashboard-host (which the test checks)."""
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    with ray_support.ray_head(env, 1) as head:
        yield dict(head, token=token)


def test_ray_dashboard_and_jobs_api_need_the_token_and_listen_on_localhost(ray_head):
    url, token = ray_head["url"], ray_head["token"]
    jobs = f"{url}/api/jobs/"
    # no token -> 401, wrong token -> 403, for reading and for submitting a job
    assert httpx.get(jobs, timeout=10).status_code == 401
    assert httpx.get(jobs, headers={"Authorization": "Bearer " + "0" * 32}, timeout=10).status_code == 403
    r = httpx.post(jobs, json={"entrypoint": "touch /tmp/bloodcnn-pwned"}, timeout=10)
    assert r.status_code == 401
    r = httpx.post(jobs, json={"entrypoint": "touch /tmp/bloodcnn-pwned"}, timeout=10,
                   headers={"X-Ray-Authorization": "Bearer wrong"})
    assert r.status_code == 403
    for path in ("/api/version", "/api/cluster_status", "/api/serve/applications/", "/api/v0/actors",
                 "/nodes?view=summary", "/api/jobs/raysubmit_x/logs"):
        assert httpx.get(url + path, timeout=10).status_code == 401, path
    # with the token: allowed
    ok = httpx.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert ok.status_code == 200 and ok.json() == []
    # bound to the loopback interface only (Ray's default --dashboard-host)
    addrs = _listening(ray_head["ports"]["dashboard-port"])
    assert addrs and addrs <= LOOPBACK, addrs


def test_ray_cluster_refuses_a_client_without_the_token(ray_head):
    """A driver with the wrong token cannot attach to the cluster (GCS checks the token)."""
    address = f"127.0.0.1:{ray_head['ports']['port']}"
    code = f"import ray; ray.init(address={address!r}); print('ATTACHED')"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="f" * 32, RAY_gcs_server_port_wait_time_s="2")
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ATTACHED" not in bad.stdout and bad.returncode != 0
    assert "InvalidAuthToken" in bad.stderr or "AuthenticationError" in bad.stderr, bad.stderr[-2000:]


# ------------------------------------------------------------------------------ models load without pickle


def _lambda_model(marker: Path):
    import tf_keras as keras

    # the marker path travels inside the marshalled lambda (as a default argument)
    code = lambda x, path=str(marker): (open(path, "w").write("code from the model file ran"), x)[1]  # noqa: E731
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Lambda(code)(inputs))


def test_models_load_without_pickle_or_code(tmp_path):
    """``bloodcnn.model.load_model`` is safe mode only: a .keras file with a Lambda layer (code)
    is refused, and so is an HDF5 file named model.keras (tf_keras' legacy loader would run it)."""
    import tf_keras as keras

    from bloodcnn.model import load_model
    from serving import devtools

    marker = tmp_path / "ran"
    model = _lambda_model(marker)
    keras_file, h5_file = tmp_path / "evil.keras", tmp_path / "model.keras"
    model.save(keras_file)
    model.save(tmp_path / "evil.h5")
    shutil.copyfile(tmp_path / "evil.h5", h5_file)
    marker.unlink(missing_ok=True)
    # control: the files really carry code, which runs when loaded without safe mode
    keras.models.load_model(str(keras_file), compile=False, safe_mode=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="(?i)lambda|safe_mode|arbitrary code"):
        load_model(keras_file)
    with pytest.raises(ValueError, match="not a zip-based .keras"):
        load_model(h5_file)
    with pytest.raises(ValueError, match="not a zip-based .keras"):
        load_model(tmp_path / "evil.h5")
    assert not marker.exists(), "code from a model file ran"

    # a regular model file holds JSON config + HDF5 weights: no pickle stream anywhere
    good = tmp_path / "good.keras"
    devtools.make_model(32, weights="none").save(good)
    with zipfile.ZipFile(good) as z:
        names = z.namelist()
        assert set(names) == {"config.json", "metadata.json", "model.weights.h5"}, names
        assert not any(z.read(n).startswith(b"\x80") for n in names)  # pickle protocol 2+ header
    assert load_model(good).output_shape == (None, 4)


def test_no_unsafe_deserialisation_in_the_code():
    """A cheap guard against regressions: no pickle/marshal loads, no unsafe YAML, no safe_mode=False."""
    patterns = {
        r"\bpickle\.loads?\(": "pickle load", r"\bmarshal\.loads?\(": "marshal load",
        r"allow_pickle\s*=\s*True": "numpy allow_pickle", r"safe_mode\s*=\s*False": "keras safe_mode=False",
        r"yaml\.load\((?![^)]*Loader=yaml\.SafeLoader)": "yaml.load without SafeLoader",
        r"yaml\.unsafe_load": "yaml.unsafe_load", r"\beval\(": "eval", r"\bexec\(": "exec",
        r"torch\.load\(": "torch.load", r"joblib\.load\(": "joblib.load",
    }
    hits = []
    for root in ("platform/bloodcnn", "serving", "jobs"):
        for path in (REPO / root).rglob("*.py"):
            text = path.read_text()
            for pattern, what in patterns.items():
                for m in re.finditer(pattern, text):
                    line = text.count("\n", 0, m.start()) + 1
                    hits.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert hits == []


# ------------------------------------------------------------------------------ chart pod security


ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}


def pss_restricted_violations(where: str, template: dict) -> list[str]:
    """Kubernetes Pod Security Standards, "restricted" profile, for one pod template."""
    spec = template["spec"]
    out = []
    psc = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag) is True:
            out.append(f"{where}: {flag}")
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            out.append(f"{where}: volume {v['name']} of type {sorted(kinds)}")
    if psc.get("runAsUser") == 0:
        out.append(f"{where}: pod runAsUser 0")
    if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        pod_seccomp_ok = False
    else:
        pod_seccomp_ok = True
    for s in psc.get("sysctls") or []:
        out.append(f"{where}: sysctl {s.get('name')}")
    for c in hs.containers(template) + list(spec.get("ephemeralContainers") or []):
        name = f"{where}/{c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities not dropping ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {caps['add']}")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)):
            out.append(f"{name}: not runAsNonRoot")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        c_seccomp = (sc.get("seccompProfile") or {}).get("type")
        if not (c_seccomp in ("RuntimeDefault", "Localhost") or (pod_seccomp_ok and c_seccomp is None)):
            out.append(f"{name}: seccomp not RuntimeDefault/Localhost")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{name}: procMount {sc['procMount']}")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.append(f"{name}: hostPort {p['hostPort']}")
    return out


@pytest.fixture(scope="module")
def chart_renders():
    hs.helm_binary()
    sets = {"default": []} | {p.stem: [p] for p in CI_VALUES}
    return {name: hs.render(values_files=files) for name, files in sets.items()}


def _ray_auth_mode(value_set: str) -> str:
    """ray.auth.mode as the value set chooses it (the chart's default is token)."""
    import yaml

    path = REPO / "helm" / "ci" / f"{value_set}.yaml"
    values = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return (((values or {}).get("ray") or {}).get("auth") or {}).get("mode", "token")


def test_chart_pods_pass_pod_security_restricted(chart_renders):
    """Every pod the chart creates (all CI value sets; KubeRay head/worker/submitter templates,
    Jobs, the dev S3, the helm test pod) runs as non-root, drops all capabilities, cannot escalate
    privileges and meets the rest of the "restricted" Pod Security Standard; the KubeRay
    autoscaler sidecar too; and Ray token auth is on for every Ray cluster unless the values
    turn it off explicitly."""
    assert _ray_auth_mode("default") == "token"
    pods = 0
    problems = []
    for name, docs in chart_renders.items():
        for doc in docs:
            for where, template in hs.pod_templates(doc):
                problems += pss_restricted_violations(f"{name}:{where}", template)
                pods += 1
            if doc["kind"] in ("RayService", "RayJob", "RayCluster"):
                spec = doc["spec"]
                cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
                # token auth unless a value set opts out explicitly (helm/ci/training-off-values.yaml does)
                expected = _ray_auth_mode(name)
                assert (cluster.get("authOptions") or {}).get("mode", "disabled") == expected, f"{name}: {doc['kind']}"
                if cluster.get("enableInTreeAutoscaling"):
                    sc = cluster["autoscalerOptions"]["securityContext"]
                    if sc.get("allowPrivilegeEscalation") is not False or "ALL" not in sc["capabilities"]["drop"]:
                        problems.append(f"{name}: {doc['kind']} autoscaler sidecar")
    assert problems == []
    assert pods >= 3 * len(chart_renders)


@pytest.mark.parametrize("breakage, expected", [
    (lambda t: t["spec"]["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    (lambda t: t["spec"]["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
    (lambda t: t["spec"]["containers"][0]["securityContext"]["capabilities"].update(drop=[]), "dropping ALL"),
    (lambda t: t["spec"]["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "adds capabilities"),
    (lambda t: (t["spec"]["securityContext"].pop("runAsNonRoot"), t["spec"]["containers"][0]["securityContext"].pop("runAsNonRoot", None)), "runAsNonRoot"),
    (lambda t: t["spec"]["securityContext"].update(runAsUser=0), "runAsUser 0"),
    (lambda t: t["spec"].update(hostNetwork=True), "hostNetwork"),
    (lambda t: t["spec"].setdefault("volumes", []).append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    (lambda t: t["spec"]["securityContext"].update(seccompProfile={"type": "Unconfined"}), "seccomp"),
])
def test_pod_security_check_catches_each_violation(chart_renders, breakage, expected):
    """The checker is not vacuous: each single violation in a rendered pod is reported."""
    doc = next(d for d in chart_renders["default"] if d["kind"] == "RayService")
    where, template = next(hs.pod_templates(doc))
    assert pss_restricted_violations(where, template) == []
    broken = copy.deepcopy(template)
    breakage(broken)
    found = pss_restricted_violations(where, broken)
    assert found and any(expected in f for f in found), found
