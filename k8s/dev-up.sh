#!/usr/bin/env bash
# Bring up bloodcnn on a local kind (default) or minikube cluster, from nothing to a served model:
#
#   1. create the cluster (k8s/kind-cluster.yaml: ingress on http://127.0.0.1:8080)
#   2. install ingress-nginx and the KubeRay operator v1.7.0
#   3. build the image from the Dockerfile and load it into the cluster
#   4. helm install ./helm with helm/ci/dev-kind-values.yaml (in-cluster dev S3, small resources)
#   5. bootstrap: upload the raw dataset (and MobileNetV2 weights) to the dev S3, run the
#      prepare-data Job, run a first training RayJob, wait until the RayService serves it
#
# Then run k8s/e2e.sh. Idempotent: re-running it rebuilds the image and upgrades the release.
#
# Needs: docker, kind (or minikube), kubectl, curl; Helm 4 (installed into .tools/bin if absent).
# Settings (environment):
#   K8S_PROVIDER=kind|minikube  CLUSTER_NAME=bloodcnn  NAMESPACE=bloodcnn  RELEASE=bloodcnn
#   DATA_DIR=<folder of class sub-folders>   default ../shared/data/all-leukemia
#   WEIGHTS_FILE=<MobileNetV2 no-top .h5>     default ../shared/weights/..., else "imagenet" (download)
#   IMAGE_TAG=<tag>                           default dev-<timestamp>
#   SKIP_BUILD=1      reuse IMAGE_TAG already loaded into the cluster
#   SKIP_BOOTSTRAP=1  stop after helm install
#   MINIKUBE_CPUS=6 MINIKUBE_MEMORY=14g       minikube sizing
set -euo pipefail

# shellcheck source=k8s/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DATA_DIR="${DATA_DIR:-${REPO_ROOT}/../shared/data/${DATASET_NAME}}"
WEIGHTS_FILE="${WEIGHTS_FILE:-${REPO_ROOT}/../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5}"
IMAGE_TAG="${IMAGE_TAG:-dev-$(date +%Y%m%d%H%M%S)}"
IMAGE="${IMAGE_REPO}:${IMAGE_TAG}"

on_exit() {
  local rc=$?
  if ((rc != 0)); then
    printf '\ndev-up.sh FAILED (exit %s). Inspect with: kubectl --context %s -n %s get pods,rayservice,rayjob,jobs\n' \
      "${rc}" "${KUBE_CONTEXT}" "${NAMESPACE}" >&2
  fi
}
trap on_exit EXIT

# ---- 0. tools ---------------------------------------------------------------------------------
log "checking tools"
case "${K8S_PROVIDER}" in
  kind) require docker kind kubectl curl ;;
  minikube) require docker minikube kubectl curl ;;
  *) die "K8S_PROVIDER must be kind or minikube (got '${K8S_PROVIDER}')" ;;
esac
docker info >/dev/null 2>&1 || die "docker is installed but the daemon is not reachable (is Docker running? are you in the docker group?)"
find_helm
info "helm: ${HELM_BIN} ($("${HELM_BIN}" version --short))"
[[ -f "${DEV_VALUES}" ]] || die "dev values file not found: ${DEV_VALUES}"
if [[ "${SKIP_BOOTSTRAP:-0}" != 1 ]]; then
  [[ -d "${DATA_DIR}" ]] || die "dataset folder not found: DATA_DIR=${DATA_DIR}
  It must hold one sub-folder of .jpg images per class (Benign, Early, Pre, Pro), e.g. the
  'Blood Cells Cancer (ALL)' dataset. Set DATA_DIR=/path/to/it, or SKIP_BOOTSTRAP=1 to only install."
fi

# ---- 1. cluster -------------------------------------------------------------------------------
log "cluster '${CLUSTER_NAME}' (${K8S_PROVIDER})"
if [[ "${K8S_PROVIDER}" == "kind" ]]; then
  if kind get clusters 2>/dev/null | grep -qx "${CLUSTER_NAME}"; then
    info "kind cluster ${CLUSTER_NAME} exists"
  else
    kind create cluster --name "${CLUSTER_NAME}" --config "${REPO_ROOT}/k8s/kind-cluster.yaml" \
      --wait "${TIMEOUT_CLUSTER}s" || die "kind create cluster failed (ports 8080/8443 on 127.0.0.1 must be free)"
  fi
else
  if minikube -p "${CLUSTER_NAME}" status >/dev/null 2>&1; then
    info "minikube profile ${CLUSTER_NAME} is running"
  else
    minikube start -p "${CLUSTER_NAME}" --cpus "${MINIKUBE_CPUS:-6}" --memory "${MINIKUBE_MEMORY:-14g}" \
      --wait=all --wait-timeout="${TIMEOUT_CLUSTER}s" || die "minikube start failed"
  fi
fi
check_context
wait_until "${TIMEOUT_CLUSTER}" "all nodes Ready" \
  kc wait --for=condition=Ready nodes --all --timeout=10s \
  || die "nodes did not become Ready: kubectl --context ${KUBE_CONTEXT} describe nodes"

# ---- 2. ingress controller and KubeRay operator -----------------------------------------------
log "ingress controller"
if [[ "${K8S_PROVIDER}" == "kind" ]]; then
  kc apply -f "https://raw.githubusercontent.com/kubernetes/ingress-nginx/${INGRESS_NGINX_VERSION}/deploy/static/provider/kind/deploy.yaml" >/dev/null \
    || die "could not apply the ingress-nginx ${INGRESS_NGINX_VERSION} manifest (network? INGRESS_NGINX_VERSION?)"
else
  minikube -p "${CLUSTER_NAME}" addons enable ingress >/dev/null || die "minikube addons enable ingress failed"
fi
kc -n ingress-nginx rollout status deployment/ingress-nginx-controller --timeout="${TIMEOUT_OPERATOR}s" \
  || die "ingress-nginx did not become ready: kubectl --context ${KUBE_CONTEXT} -n ingress-nginx get pods"
# Its admission webhook only accepts Ingresses once the patch Job has set the CA bundle.
if kc -n ingress-nginx get job ingress-nginx-admission-patch >/dev/null 2>&1; then
  kc -n ingress-nginx wait --for=condition=complete job/ingress-nginx-admission-patch --timeout=300s >/dev/null \
    || die "ingress-nginx admission webhook setup did not finish: kubectl --context ${KUBE_CONTEXT} -n ingress-nginx get jobs"
fi

log "KubeRay operator ${KUBERAY_VERSION}"
hlm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null \
  || die "helm repo add kuberay failed (network?)"
hlm repo update kuberay >/dev/null || die "helm repo update kuberay failed"
hlm upgrade --install kuberay-operator kuberay/kuberay-operator --version "${KUBERAY_VERSION}" \
  --namespace "${KUBERAY_NAMESPACE}" --create-namespace --wait --timeout "${TIMEOUT_OPERATOR}s" >/dev/null \
  || die "installing kuberay-operator ${KUBERAY_VERSION} failed: kubectl --context ${KUBE_CONTEXT} -n ${KUBERAY_NAMESPACE} get pods"
for crd in rayclusters.ray.io rayjobs.ray.io rayservices.ray.io; do
  kc wait --for=condition=Established "crd/${crd}" --timeout=120s >/dev/null || die "CRD ${crd} is not established"
done

# ---- 3. image ---------------------------------------------------------------------------------
if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
  log "skipping the image build (SKIP_BUILD=1): using ${IMAGE}"
else
  log "building ${IMAGE}"
  docker build -t "${IMAGE}" "${REPO_ROOT}" || die "docker build failed"
  log "loading ${IMAGE} into the cluster (a few minutes for a multi-GB image)"
  if [[ "${K8S_PROVIDER}" == "kind" ]]; then
    kind load docker-image "${IMAGE}" --name "${CLUSTER_NAME}" || die "kind load docker-image failed"
  else
    minikube -p "${CLUSTER_NAME}" image load "${IMAGE}" || die "minikube image load failed"
  fi
fi

# ---- 4. helm install --------------------------------------------------------------------------
log "installing the chart (release ${RELEASE}, namespace ${NAMESPACE})"
kc create namespace "${NAMESPACE}" --dry-run=client -o yaml | kc apply -f - >/dev/null
extra_args=()
weights_uri=""
if [[ -f "${WEIGHTS_FILE}" ]]; then
  weights_uri="s3://${S3_BUCKET}/weights/$(basename "${WEIGHTS_FILE}")"
  extra_args+=(--set "config.train.weights=${weights_uri}")
  info "training will load MobileNetV2 weights from ${weights_uri}"
else
  info "no WEIGHTS_FILE (${WEIGHTS_FILE}); training downloads the ImageNet weights (needs internet in the pods)"
fi
# No --wait: the RayService only becomes Ready once a model is trained (step 5).
hlm upgrade --install "${RELEASE}" "${CHART_DIR}" --namespace "${NAMESPACE}" \
  --values "${DEV_VALUES}" --set "image.repository=${IMAGE_REPO}" --set "image.tag=${IMAGE_TAG}" \
  --set "s3.bucket=${S3_BUCKET}" --set "datasetName=${DATASET_NAME}" \
  --set training.enabled=false --set dataPrep.enabled=false \
  ${extra_args[@]+"${extra_args[@]}"} --timeout 10m >/dev/null \
  || die "helm upgrade --install failed"
kcn rollout status "deployment/${RELEASE_FULLNAME}-s3" --timeout="${TIMEOUT_POD}s" \
  || die "the dev S3 did not become ready: kubectl --context ${KUBE_CONTEXT} -n ${NAMESPACE} describe deployment ${RELEASE_FULLNAME}-s3"

if [[ "${SKIP_BOOTSTRAP:-0}" == 1 ]]; then
  log "done (SKIP_BOOTSTRAP=1): no data, no model yet"
  trap - EXIT
  exit 0
fi

# ---- 5. bootstrap: data, data preparation, first model -----------------------------------------
log "waiting for the serving Ray head pod (pulls and starts the image)"
wait_until "${TIMEOUT_POD}" "a Ready serving head pod" has_ready_pod \
  "app.kubernetes.io/instance=${RELEASE},app.kubernetes.io/component=serving,bloodcnn.io/ray-node-type=head" \
  || { dump_serving; die "no serving head pod became Ready"; }
head_pod="$(serving_head_pod)"
[[ -n "${head_pod}" ]] || die "no Ready serving head pod found"

# Upload through the head pod: it has the S3 endpoint and credentials in its environment.
upload_dir() {  # local_dir s3_prefix
  local src="$1" prefix="$2" staging
  staging="/tmp/upload-$(date +%s)"
  info "copying ${src} into ${head_pod}:${staging}"
  kcn cp "${src}" "${head_pod}:${staging}" -c ray-head || die "kubectl cp to ${head_pod} failed"
  kcn exec "${head_pod}" -c ray-head -- python -c '
import pathlib, sys, boto3
src, uri = pathlib.Path(sys.argv[1]), sys.argv[2]
bucket, _, prefix = uri[len("s3://"):].partition("/")
s3 = boto3.client("s3")
files = [p for p in sorted(src.rglob("*")) if p.is_file()]
for p in files:
    s3.upload_file(str(p), bucket, f"{prefix.rstrip("/")}/{p.relative_to(src).as_posix()}")
print(f"uploaded {len(files)} files to {uri}")
' "${staging}" "${prefix}" || die "upload to ${prefix} failed"
  kcn exec "${head_pod}" -c ray-head -- rm -rf "${staging}" || true
}

log "uploading the raw dataset to s3://${S3_BUCKET}/raw/${DATASET_NAME}"
upload_dir "${DATA_DIR}" "s3://${S3_BUCKET}/raw/${DATASET_NAME}"
if [[ -n "${weights_uri}" ]]; then
  log "uploading the MobileNetV2 weights to ${weights_uri}"
  weights_dir="$(mktemp -d)"
  cp "${WEIGHTS_FILE}" "${weights_dir}/"
  upload_dir "${weights_dir}" "s3://${S3_BUCKET}/weights"
  rm -rf "${weights_dir}"
fi

log "preparing the dataset (prepare-data Job)"
hlm upgrade "${RELEASE}" "${CHART_DIR}" --namespace "${NAMESPACE}" --reuse-values \
  --set dataPrep.enabled=true --timeout 10m >/dev/null || die "helm upgrade (dataPrep.enabled=true) failed"
wait_job "app.kubernetes.io/instance=${RELEASE},app.kubernetes.io/component=prepare-data" "${TIMEOUT_DATA_PREP}" \
  || die "the prepare-data Job did not complete"

log "training the first model (RayJob)"
hlm upgrade "${RELEASE}" "${CHART_DIR}" --namespace "${NAMESPACE}" --reuse-values \
  --set training.enabled=true --set training.runId=bootstrap --timeout 10m >/dev/null \
  || die "helm upgrade (training.enabled=true) failed"
wait_rayjob "${RELEASE_FULLNAME}-train-bootstrap" "${TIMEOUT_TRAINING}" || die "the bootstrap training RayJob failed"

log "waiting for the RayService to serve the model"
wait_until "${TIMEOUT_SERVING}" "RayService ${RELEASE_FULLNAME} Ready" rayservice_ready \
  || { dump_serving; die "the RayService did not become Ready (is a production model registered? see above)"; }

ingress_url="${INGRESS_URL:-http://127.0.0.1:8080}"
if [[ "${K8S_PROVIDER}" == "minikube" && -z "${INGRESS_URL:-}" ]]; then
  ingress_url="http://$(minikube -p "${CLUSTER_NAME}" ip)"
fi
readyz_ok() { curl -fsS --max-time 10 "${ingress_url}/readyz" >/dev/null; }
wait_until "${TIMEOUT_HTTP}" "GET ${ingress_url}/readyz -> 200 (model loaded)" readyz_ok \
  || { curl -sS --max-time 10 "${ingress_url}/readyz" >&2 || true; dump_serving; die "the API did not become ready"; }

trap - EXIT
log "bloodcnn is up"
cat >&2 <<EOF
    API:        ${ingress_url}/readyz   (docs at /docs)
    End to end: k8s/e2e.sh
    Helm test:  ${HELM_BIN} --kube-context ${KUBE_CONTEXT} test ${RELEASE} -n ${NAMESPACE} --logs
    Teardown:   kind delete cluster --name ${CLUSTER_NAME}   (minikube: minikube delete -p ${CLUSTER_NAME})
EOF
