# shellcheck shell=bash
# Shared settings and helpers for k8s/dev-up.sh and k8s/e2e.sh (sourced, not executed).
# Every wait has a deadline; every failure prints what to look at.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ---- settings (override from the environment) ---------------------------------------------
K8S_PROVIDER="${K8S_PROVIDER:-kind}"                 # kind | minikube
CLUSTER_NAME="${CLUSTER_NAME:-bloodcnn}"
NAMESPACE="${NAMESPACE:-bloodcnn}"
RELEASE="${RELEASE:-bloodcnn}"
CHART_DIR="${CHART_DIR:-${REPO_ROOT}/helm}"
DEV_VALUES="${DEV_VALUES:-${REPO_ROOT}/helm/ci/dev-kind-values.yaml}"
IMAGE_REPO="${IMAGE_REPO:-bloodcnn}"
KUBERAY_VERSION="${KUBERAY_VERSION:-1.7.0}"
KUBERAY_NAMESPACE="${KUBERAY_NAMESPACE:-kuberay-system}"
INGRESS_NGINX_VERSION="${INGRESS_NGINX_VERSION:-controller-v1.15.1}"
DATASET_NAME="${DATASET_NAME:-all-leukemia}"
S3_BUCKET="${S3_BUCKET:-bloodcnn}"
PREDICT_FIELD="${PREDICT_FIELD:-file}"

# Timeouts, in seconds.
TIMEOUT_CLUSTER="${TIMEOUT_CLUSTER:-600}"
TIMEOUT_OPERATOR="${TIMEOUT_OPERATOR:-600}"
TIMEOUT_POD="${TIMEOUT_POD:-1200}"               # image pulls of the multi-GB Ray image included
TIMEOUT_DATA_PREP="${TIMEOUT_DATA_PREP:-2400}"
TIMEOUT_TRAINING="${TIMEOUT_TRAINING:-5400}"
TIMEOUT_SERVING="${TIMEOUT_SERVING:-1800}"
TIMEOUT_HTTP="${TIMEOUT_HTTP:-600}"

if [[ "${K8S_PROVIDER}" == "kind" ]]; then
  KUBE_CONTEXT="${KUBE_CONTEXT:-kind-${CLUSTER_NAME}}"
else
  KUBE_CONTEXT="${KUBE_CONTEXT:-${CLUSTER_NAME}}"   # minikube -p NAME names the context NAME
fi

# ---- output -----------------------------------------------------------------------------------
log()  { printf '\n==> %s\n' "$*" >&2; }
info() { printf '    %s\n' "$*" >&2; }
die()  { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

# ---- tools ------------------------------------------------------------------------------------
require() {
  local missing=()
  local tool
  for tool in "$@"; do
    command -v "${tool}" >/dev/null 2>&1 || missing+=("${tool}")
  done
  if ((${#missing[@]})); then
    die "missing required tool(s): ${missing[*]}. Install them first (docs/kubernetes.md lists versions and links)."
  fi
}

# Helm 4: the one on PATH if it is v4, else the repository's .tools/bin/helm (scripts/get-helm.sh).
find_helm() {
  local candidate version
  for candidate in "$(command -v helm 2>/dev/null || true)" "${REPO_ROOT}/.tools/bin/helm"; do
    [[ -n "${candidate}" && -x "${candidate}" ]] || continue
    version="$("${candidate}" version --short 2>/dev/null || true)"
    if [[ "${version}" == v4.* ]]; then
      HELM_BIN="${candidate}"
      return 0
    fi
  done
  info "no Helm 4 found; installing it into .tools/bin with scripts/get-helm.sh"
  bash "${REPO_ROOT}/scripts/get-helm.sh" >&2 || die "could not install Helm 4 (scripts/get-helm.sh)"
  HELM_BIN="${REPO_ROOT}/.tools/bin/helm"
}

kc()   { kubectl --context "${KUBE_CONTEXT}" "$@"; }
kcn()  { kubectl --context "${KUBE_CONTEXT}" -n "${NAMESPACE}" "$@"; }
hlm()  { "${HELM_BIN}" --kube-context "${KUBE_CONTEXT}" "$@"; }

check_context() {
  kc cluster-info >/dev/null 2>&1 \
    || die "cannot reach the cluster of kube context '${KUBE_CONTEXT}'. Run k8s/dev-up.sh first (or set KUBE_CONTEXT)."
}

# ---- waits ------------------------------------------------------------------------------------
# wait_until TIMEOUT DESCRIPTION COMMAND...: re-run COMMAND every 5 s until it succeeds.
wait_until() {
  local timeout="$1" what="$2"
  shift 2
  local deadline=$((SECONDS + timeout))
  info "waiting up to ${timeout}s for ${what}"
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      return 1
    fi
    sleep 5
  done
  info "ok: ${what}"
}

# First Running+Ready pod matching a label selector in NAMESPACE (empty if none).
ready_pod() {
  kcn get pods -l "$1" \
    -o jsonpath='{range .items[?(@.status.phase=="Running")]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
    2>/dev/null | awk '$2 == "True" {print $1; exit}'
}

has_ready_pod() { [[ -n "$(ready_pod "$1")" ]]; }

# The head pod of the RayService's active cluster (falls back to any serving head).
serving_head_pod() {
  local cluster pod=""
  cluster="$(kcn get rayservice "${RELEASE_FULLNAME}" -o jsonpath='{.status.activeServiceStatus.rayClusterName}' 2>/dev/null || true)"
  if [[ -n "${cluster}" ]]; then
    pod="$(ready_pod "ray.io/cluster=${cluster},ray.io/node-type=head")"
  fi
  if [[ -z "${pod}" ]]; then
    pod="$(ready_pod "app.kubernetes.io/instance=${RELEASE},app.kubernetes.io/component=serving,bloodcnn.io/ray-node-type=head")"
  fi
  printf '%s' "${pod}"
}

rayservice_ready() {
  [[ "$(kcn get rayservice "${RELEASE_FULLNAME}" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == "True" ]]
}

# Wait for a RayJob to finish; returns 0 only when the Ray job SUCCEEDED.
wait_rayjob() {
  local name="$1" timeout="$2"
  local deadline=$((SECONDS + timeout)) deploy job last=""
  info "waiting up to ${timeout}s for RayJob ${name}"
  while ((SECONDS < deadline)); do
    deploy="$(kcn get rayjob "${name}" -o jsonpath='{.status.jobDeploymentStatus}' 2>/dev/null || true)"
    job="$(kcn get rayjob "${name}" -o jsonpath='{.status.jobStatus}' 2>/dev/null || true)"
    if [[ "${deploy}/${job}" != "${last}" ]]; then
      info "RayJob ${name}: deployment=${deploy:-?} job=${job:-?}"
      last="${deploy}/${job}"
    fi
    if [[ "${job}" == "SUCCEEDED" && ( "${deploy}" == "Complete" || "${deploy}" == "Running" ) ]]; then
      return 0
    fi
    if [[ "${job}" == "FAILED" || "${job}" == "STOPPED" || "${deploy}" == "Failed" ]]; then
      dump_rayjob "${name}"
      return 1
    fi
    sleep 10
  done
  dump_rayjob "${name}"
  info "RayJob ${name} did not finish within ${timeout}s"
  return 1
}

dump_rayjob() {
  local name="$1"
  printf '\n---- kubectl describe rayjob %s\n' "${name}" >&2
  kcn describe rayjob "${name}" >&2 || true
  printf '\n---- submitter logs (last 200 lines)\n' >&2
  kcn logs --tail=200 -l "app.kubernetes.io/instance=${RELEASE},bloodcnn.io/ray-node-type=submitter" >&2 || true
}

# Wait for a batch Job (selected by labels) to complete; fail fast when it fails.
wait_job() {
  local selector="$1" timeout="$2"
  local deadline=$((SECONDS + timeout)) succeeded failed name
  info "waiting up to ${timeout}s for Job ${selector}"
  while ((SECONDS < deadline)); do
    name="$(kcn get jobs -l "${selector}" -o jsonpath='{.items[-1:].metadata.name}' 2>/dev/null || true)"
    if [[ -n "${name}" ]]; then
      succeeded="$(kcn get job "${name}" -o jsonpath='{.status.conditions[?(@.type=="Complete")].status}' 2>/dev/null || true)"
      failed="$(kcn get job "${name}" -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}' 2>/dev/null || true)"
      if [[ "${succeeded}" == "True" ]]; then
        info "ok: Job ${name} completed"
        return 0
      fi
      if [[ "${failed}" == "True" ]]; then
        kcn describe job "${name}" >&2 || true
        kcn logs --tail=200 "job/${name}" >&2 || true
        info "Job ${name} failed"
        return 1
      fi
    fi
    sleep 10
  done
  [[ -n "${name}" ]] && { kcn describe job "${name}" >&2 || true; kcn logs --tail=200 "job/${name}" >&2 || true; }
  info "Job ${selector} did not complete within ${timeout}s"
  return 1
}

dump_serving() {
  printf '\n---- kubectl describe rayservice %s\n' "${RELEASE_FULLNAME}" >&2
  kcn describe rayservice "${RELEASE_FULLNAME}" >&2 || true
  printf '\n---- pods\n' >&2
  kcn get pods -o wide >&2 || true
  local head
  head="$(serving_head_pod)"
  if [[ -n "${head}" ]]; then
    printf '\n---- serve status (%s)\n' "${head}" >&2
    kcn exec "${head}" -c ray-head -- serve status >&2 || true
  fi
}

# The chart's fullname for RELEASE (what the RayService and its services are named after).
release_fullname() {
  if [[ "${RELEASE}" == *bloodcnn* ]]; then
    printf '%s' "${RELEASE:0:40}" | sed 's/-*$//'
  else
    printf '%s' "${RELEASE}-bloodcnn" | cut -c1-40 | sed 's/-*$//'
  fi
}
RELEASE_FULLNAME="$(release_fullname)"
