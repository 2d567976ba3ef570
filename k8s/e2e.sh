#!/usr/bin/env bash
# End-to-end check of a bloodcnn release brought up by k8s/dev-up.sh:
#
#   1. the RayService is Ready and GET /readyz answers 200 through the Ingress
#   2. POST /v1/predict with a cell image through the Ingress answers 200 with JSON
#   3. a new training RayJob completes and registers a new model version in the registry
#      (`bloodcnn models list --json` in the serving head pod, before and after)
#   4. `helm test` (GET /readyz + a sample prediction from inside the cluster)
#
# Exit status 0 only if every step passed. Every wait has a timeout (see k8s/lib.sh).
# Needs: kubectl, curl, python3; Helm 4 (installed into .tools/bin if absent).
# Settings (environment): the ones of k8s/lib.sh, plus
#   INGRESS_URL=http://127.0.0.1:8080   (kind default; minikube: http://$(minikube -p NAME ip))
#   DATA_DIR=<folder of class sub-folders> to take the sample image from (else one is generated)
#   API_KEY=<key> and API_KEY_HEADER=X-API-Key when the release sets apiKey
set -euo pipefail

# shellcheck source=k8s/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DATA_DIR="${DATA_DIR:-${REPO_ROOT}/../shared/data/${DATASET_NAME}}"
API_KEY_HEADER="${API_KEY_HEADER:-X-API-Key}"
work="$(mktemp -d)"
on_exit() {
  local rc=$?
  rm -rf "${work}"
  if ((rc != 0)); then
    printf '\ne2e.sh FAILED (exit %s)\n' "${rc}" >&2
  fi
}
trap on_exit EXIT

log "checking tools and cluster"
require kubectl curl python3
find_helm
check_context
if [[ -z "${INGRESS_URL:-}" ]]; then
  if [[ "${K8S_PROVIDER}" == "minikube" ]]; then
    require minikube
    INGRESS_URL="http://$(minikube -p "${CLUSTER_NAME}" ip)"
  else
    INGRESS_URL="http://127.0.0.1:8080"
  fi
fi
hlm status "${RELEASE}" --namespace "${NAMESPACE}" >/dev/null 2>&1 \
  || die "release ${RELEASE} not found in namespace ${NAMESPACE}: run k8s/dev-up.sh first"
auth_args=()
if [[ -n "${API_KEY:-}" ]]; then
  auth_args=(-H "${API_KEY_HEADER}: ${API_KEY}")
fi

# ---- 1. ready ---------------------------------------------------------------------------------
log "1/4 RayService ready, /readyz through the Ingress (${INGRESS_URL})"
wait_until "${TIMEOUT_SERVING}" "RayService ${RELEASE_FULLNAME} Ready" rayservice_ready \
  || { dump_serving; die "the RayService is not Ready"; }
readyz_ok() { curl -fsS --max-time 10 ${auth_args[@]+"${auth_args[@]}"} "${INGRESS_URL}/readyz" >/dev/null; }
wait_until "${TIMEOUT_HTTP}" "GET ${INGRESS_URL}/readyz -> 200" readyz_ok || {
  curl -sS --max-time 10 -i "${INGRESS_URL}/readyz" >&2 || true
  kcn get ingress -o wide >&2 || true
  die "GET ${INGRESS_URL}/readyz did not return 200 (ingress-nginx running? ports mapped by k8s/kind-cluster.yaml?)"
}

# ---- 2. predict -------------------------------------------------------------------------------
log "2/4 POST /v1/predict through the Ingress"
head_pod="$(serving_head_pod)"
[[ -n "${head_pod}" ]] || { dump_serving; die "no Ready serving head pod"; }
sample="${work}/cell.jpg"
first_image="$(find "${DATA_DIR}" -type f \( -iname '*.jpg' -o -iname '*.jpeg' \) 2>/dev/null | sort | head -n 1 || true)"
if [[ -n "${first_image}" ]]; then
  cp "${first_image}" "${sample}"
  info "sample image: ${first_image}"
else
  info "no image under DATA_DIR=${DATA_DIR}; generating one in ${head_pod}"
  kcn exec "${head_pod}" -c ray-head -- python -c '
import io, sys
from PIL import Image, ImageDraw
img = Image.new("RGB", (224, 224), (228, 200, 215))
ImageDraw.Draw(img).ellipse((64, 64, 160, 160), fill=(110, 50, 140))
buf = io.BytesIO(); img.save(buf, format="JPEG", quality=90); sys.stdout.buffer.write(buf.getvalue())
' >"${sample}" || die "could not generate a sample image in ${head_pod}"
fi
status="$(curl -sS --max-time 120 -o "${work}/predict.json" -w '%{http_code}' \
  ${auth_args[@]+"${auth_args[@]}"} -F "${PREDICT_FIELD}=@${sample};type=image/jpeg" "${INGRESS_URL}/v1/predict")" \
  || die "POST ${INGRESS_URL}/v1/predict failed to connect"
if [[ "${status}" != "200" ]]; then
  cat "${work}/predict.json" >&2 || true
  die "POST /v1/predict returned HTTP ${status} (field name '${PREDICT_FIELD}'; set PREDICT_FIELD if the API expects another)"
fi
python3 -m json.tool "${work}/predict.json" >&2 || die "POST /v1/predict did not return JSON"
info "ok: prediction returned"

# ---- 3. training ------------------------------------------------------------------------------
log "3/4 training RayJob registers a new model version"
count_versions() {
  local pod
  pod="$(serving_head_pod)"
  [[ -n "${pod}" ]] || return 1
  kcn exec "${pod}" -c ray-head -- bloodcnn models list --json \
    | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))'
}
before="$(count_versions)" || die "could not list model versions (kubectl exec ${head_pod} -- bloodcnn models list --json)"
info "model versions before: ${before}"
run_id="e2e-$(date +%s)"
hlm upgrade "${RELEASE}" "${CHART_DIR}" --namespace "${NAMESPACE}" --reuse-values \
  --set training.enabled=true --set "training.runId=${run_id}" --timeout 10m >/dev/null \
  || die "helm upgrade (training.runId=${run_id}) failed"
wait_rayjob "${RELEASE_FULLNAME}-train-${run_id}" "${TIMEOUT_TRAINING}" || die "the training RayJob did not succeed"
after="$(count_versions)" || die "could not list model versions after training"
info "model versions after: ${after}"
((after > before)) || die "training succeeded but no new model version was registered (${before} -> ${after})"
kcn exec "$(serving_head_pod)" -c ray-head -- bloodcnn models list >&2 || true
info "ok: a new model version is registered"

# ---- 4. helm test -----------------------------------------------------------------------------
log "4/4 helm test"
hlm test "${RELEASE}" --namespace "${NAMESPACE}" --timeout 15m --logs \
  || die "helm test failed (kubectl --context ${KUBE_CONTEXT} -n ${NAMESPACE} logs ${RELEASE_FULLNAME}-test-predict)"

log "e2e PASSED"
