# shellcheck shell=bash
# Pinned versions of the local cluster's parts (sourced). Changing one rebuilds only that part.
KUBERNETES_VERSION="${KUBERNETES_VERSION:-v1.34.4}"
KUBERAY_VERSION="${KUBERAY_VERSION:-v1.7.0}"
# Built when the Go module proxy refuses KUBERAY_VERSION (it answered 403 for v1.7.0 here).
KUBERAY_FALLBACK_VERSION="${KUBERAY_FALLBACK_VERSION:-v1.6.2}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}"
# Builds and images live outside the repo, so clones and CI runs on one machine share them.
BLOODCNN_CACHE="${BLOODCNN_CACHE:-${XDG_CACHE_HOME:-${HOME}/.cache}/bloodcnn}"
K8S_CACHE="${BLOODCNN_CACHE}/k8s"
