#!/usr/bin/env bash
# Installs what the local cluster needs from Debian (etcd, containerd, runc, CNI plugins, iptables,
# buildah/podman for the images, debootstrap for the base image) when a tool is missing, and
# checks for Go. Quiet when everything is there.
set -euo pipefail

declare -A PKG=(
  [etcd]=etcd-server [containerd]=containerd [runc]=runc [iptables]=iptables [conntrack]=conntrack
  [buildah]=buildah [podman]=podman [debootstrap]=debootstrap [openssl]=openssl [nsenter]=util-linux
)
missing=()
for tool in "${!PKG[@]}"; do
  command -v "${tool}" >/dev/null 2>&1 || missing+=("${PKG[${tool}]}")
done
[[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
if ((${#missing[@]})); then
  [[ "$(id -u)" == 0 ]] || { echo "error: the local cluster needs root (to install: ${missing[*]})" >&2; exit 1; }
  echo "    installing Debian packages: ${missing[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v go >/dev/null 2>&1 || [[ -x /usr/local/go/bin/go ]] \
  || { echo "error: Go >= 1.24 is needed to build Kubernetes, KubeRay and CoreDNS (https://go.dev/dl/)" >&2; exit 1; }
