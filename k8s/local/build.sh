#!/usr/bin/env bash
# Builds the local cluster's Go binaries into a cache outside the repo, keyed by version and
# checked by sha256: Kubernetes (k8s.io/kubernetes), the KubeRay operator, CoreDNS, and the
# pod-sandbox "pause" binary. A second run with the same versions builds nothing.
#
#   bash k8s/local/build.sh            # build what is missing, verify what is cached
#   BLOODCNN_CACHE=/path bash k8s/local/build.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
source "${HERE}/versions.sh"

K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false" GOTOOLCHAIN=local

say() { printf '    %s\n' "$*" >&2; }

# Go's download and compile chatter goes to a log; a failure shows its end.
BUILD_LOG="${K8S_CACHE}/build.log"
quiet() {
  "$@" >>"${BUILD_LOG}" 2>&1 || { echo "error: $* failed; last lines of ${BUILD_LOG}:" >&2; tail -n 30 "${BUILD_LOG}" >&2; return 1; }
}

# verify DIR: true when DIR/SHA256SUMS exists and every file in it matches.
verify() {
  [[ -s "$1/SHA256SUMS" ]] && (cd "$1" && sha256sum --quiet --status -c SHA256SUMS)
}

# seal DIR: record the sha256 of every binary in DIR/bin, written last so a half-built
# directory never verifies.
seal() {
  (cd "$1" && sha256sum bin/* $(ls ./*.yaml 2>/dev/null) > SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
}

build_kubernetes() {
  local dir="${K8S_CACHE}/kubernetes-${KUBERNETES_VERSION}"
  if verify "${dir}"; then say "kubernetes ${KUBERNETES_VERSION}: cached (${dir})"; return; fi
  say "kubernetes ${KUBERNETES_VERSION}: building ${K8S_BINARIES[*]} (15-30 min on 2 cores)"
  rm -rf "${dir}" && mkdir -p "${dir}/src" "${dir}/bin"
  local minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  local staging="v0.${KUBERNETES_VERSION#v1.}"
  # k8s.io/kubernetes replaces its staging modules with ./staging paths; as a dependency each
  # needs a replace to its published v0.<minor>.<patch> module instead.
  go mod download -json "k8s.io/kubernetes@${KUBERNETES_VERSION}" > "${dir}/src/download.json" 2>>"${BUILD_LOG}"
  local gomod; gomod="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["GoMod"])' "${dir}/src/download.json")"
  {
    echo "module bloodcnn.local/k8sbuild"
    echo "go 1.24.0"
    echo "require k8s.io/kubernetes ${KUBERNETES_VERSION}"
    grep -E '=> \./staging/' "${gomod}" | awk -v v="${staging}" '{print "replace " $1 " => " $1 " " v}'
  } > "${dir}/src/go.mod"
  printf 'package k8sbuild\n\nimport (\n' > "${dir}/src/tools.go"
  for b in "${K8S_BINARIES[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$b" >> "${dir}/src/tools.go"; done
  printf ')\n' >> "${dir}/src/tools.go"
  sed -i '1i //go:build tools' "${dir}/src/tools.go"
  local pkg ldflags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${pkg}.gitVersion=${KUBERNETES_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
    ldflags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
  done
  (
    cd "${dir}/src"
    go mod tidy -e >/dev/null 2>&1 || true
    targets=(); for b in "${K8S_BINARIES[@]}"; do targets+=("k8s.io/kubernetes/cmd/$b"); done
    quiet go build -tags tools -trimpath -ldflags "-s -w${ldflags}" -o "${dir}/bin/" "${targets[@]}"
  )
  seal "${dir}"
}

# go_install NAME MODULE@VERSION [PACKAGE]: a module whose main package builds with go install.
go_install() {
  local name="$1" modver="$2" pkg="${3:-$2}" dir="${K8S_CACHE}/$1-${2##*@}"
  if verify "${dir}"; then say "${name} ${modver##*@}: cached (${dir})"; return; fi
  say "${name} ${modver##*@}: building"
  rm -rf "${dir}" && mkdir -p "${dir}/bin"
  GOBIN="${dir}/bin" quiet go install -trimpath -ldflags "-s -w" "${pkg}"
  seal "${dir}"
}

build_kuberay() {
  # The proxy may refuse a version ("403 Forbidden: This module version is not available");
  # then the newest one it serves (KUBERAY_FALLBACK_VERSION) is built, and `up` says which.
  local v
  for v in "${KUBERAY_VERSION}" "${KUBERAY_FALLBACK_VERSION}"; do
    if verify "${K8S_CACHE}/kuberay-${v}"; then say "kuberay ${v}: cached"; return; fi
    if [[ "$v" == "${KUBERAY_VERSION}" ]] \
       && ! go mod download "github.com/ray-project/kuberay/ray-operator@${v}" 2>"${K8S_CACHE}/kuberay-download.err"; then
      say "kuberay ${v}: $(tail -n 2 "${K8S_CACHE}/kuberay-download.err" | tr '\n\t' '  ')"
      say "kuberay: falling back to ${KUBERAY_FALLBACK_VERSION}"
      continue
    fi
    local dir="${K8S_CACHE}/kuberay-${v}"
    say "kuberay ${v}: building the operator"
    rm -rf "${dir}" && mkdir -p "${dir}/bin"
    GOBIN="${dir}/bin" quiet go install -trimpath -ldflags "-s -w" "github.com/ray-project/kuberay/ray-operator@${v}"
    mv "${dir}/bin/ray-operator" "${dir}/bin/kuberay-operator"
    # The operator's own RBAC (kubebuilder-generated), applied by cluster.sh.
    cp "$(go env GOMODCACHE)/github.com/ray-project/kuberay/ray-operator@${v}/config/rbac/role.yaml" "${dir}/role.yaml"
    seal "${dir}"
    return
  done
}

build_pause() {
  local dir="${K8S_CACHE}/pause-${KUBERNETES_VERSION}"
  if verify "${dir}"; then say "pause: cached"; return; fi
  rm -rf "${dir}" && mkdir -p "${dir}/bin"
  local src; src="$(go env GOMODCACHE)/k8s.io/kubernetes@${KUBERNETES_VERSION}/build/pause/linux/pause.c"
  [[ -f "${src}" ]] || quiet go mod download "k8s.io/kubernetes@${KUBERNETES_VERSION}"
  gcc -Os -static -Wall -DVERSION="${KUBERNETES_VERSION}" -o "${dir}/bin/pause" "${src}"
  seal "${dir}"
}

mkdir -p "${K8S_CACHE}"
case "${1:-all}" in
  kubernetes) build_kubernetes ;;
  kuberay) build_kuberay ;;
  coredns) go_install coredns "github.com/coredns/coredns@${COREDNS_VERSION}" ;;
  pause) build_pause ;;
  all)
    build_pause
    build_kuberay
    go_install coredns "github.com/coredns/coredns@${COREDNS_VERSION}"
    build_kubernetes
    ;;
  *) echo "usage: $0 [all|kubernetes|kuberay|coredns|pause]" >&2; exit 2 ;;
esac
