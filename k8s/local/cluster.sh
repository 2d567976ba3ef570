#!/usr/bin/env bash
# A one-node Kubernetes from real parts, without Docker: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet and kube-proxy (built from k8s.io/kubernetes),
# containerd + runc + the CNI bridge, CoreDNS and the KubeRay operator as pods. Everything runs
# in a network namespace of its own (a veth pair links it to the host), with TLS, Node+RBAC
# authorization and ServiceAccount tokens.
#
#   k8s/local-cluster.sh up        build what is missing (cached), start, wait until ready
#   k8s/local-cluster.sh down      stop everything, undo every host change
#   k8s/local-cluster.sh status    what runs
#   k8s/local-cluster.sh env       exports for kubectl/helm (KUBECONFIG) and the namespace
#   k8s/local-cluster.sh exec CMD  run CMD inside the cluster's network namespace (ClusterIPs work)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${HERE}/../.." && pwd)"
# shellcheck source=versions.sh
source "${HERE}/versions.sh"
export PATH="/usr/local/go/bin:/usr/sbin:/sbin:${PATH}"

NETNS="${BLOODCNN_K8S_NETNS:-bloodcnn-k8s}"
STATE="${BLOODCNN_K8S_STATE:-/var/lib/bloodcnn-k8s}"
NODE_NAME="bloodcnn-node"
HOST_IF="bck8s-host"; NODE_IF="bck8s-node"
HOST_IP="10.241.0.1"; NODE_IP="10.241.0.2"
POD_CIDR="10.242.0.0/24"; CLUSTER_CIDR="10.242.0.0/16"
SERVICE_CIDR="10.243.0.0/16"; API_SERVICE_IP="10.243.0.1"; DNS_IP="10.243.0.10"
KUBERAY_CRDS="${KUBERAY_CRDS:-${REPO_ROOT}/../shared/k8s-schemas/kuberay-v1.7.0}"
PAUSE_IMAGE="localhost/bloodcnn/pause:${KUBERNETES_VERSION}"
# The host sysctls the kubelet and container runtimes change (restored by `down`).
HOST_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward)
PROCS=(etcd containerd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

say()  { printf '==> %s\n' "$*" >&2; }
info() { printf '    %s\n' "$*" >&2; }
die()  { printf 'error: %s\n' "$*" >&2; exit 1; }

KUBECONFIG_ADMIN="${STATE}/pki/admin.kubeconfig"
KUBECTL="${KUBECTL:-$(command -v kubectl || echo "${REPO_ROOT}/.venv/bin/kubectl")}"
kc() { "${KUBECTL}" --kubeconfig "${KUBECONFIG_ADMIN}" "$@"; }
in_ns() { nsenter --net="/run/netns/${NETNS}" -- "$@"; }

k8s_bin() { echo "${K8S_CACHE}/kubernetes-${KUBERNETES_VERSION}/bin/$1"; }

# ---- processes ---------------------------------------------------------------------------------
# start NAME CMD...: run CMD in the namespace, detached, logging to STATE/logs/NAME.log.
start() {
  local name="$1"; shift
  setsid nsenter --net="/run/netns/${NETNS}" -- "$@" >"${STATE}/logs/${name}.log" 2>&1 < /dev/null &
  echo $! > "${STATE}/pids/${name}"
}

alive() { [[ -s "${STATE}/pids/$1" ]] && kill -0 "$(cat "${STATE}/pids/$1")" 2>/dev/null; }

# wait_for SECONDS WHAT CMD...: poll CMD once a second; on timeout show the logs that explain why.
wait_for() {
  local timeout="$1" what="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      info "timed out after ${timeout}s waiting for ${what}"
      local f
      for f in "${STATE}"/logs/*.log; do [[ -s "$f" ]] && { echo "---- tail ${f}"; tail -n 15 "$f"; }; done >&2
      return 1
    fi
    sleep 1
  done
}

stop_proc() {  # stop_proc NAME: TERM, then KILL after 10 s
  local pidf="${STATE}/pids/$1" pid i
  [[ -s "${pidf}" ]] || return 0
  pid="$(cat "${pidf}")"
  if kill -0 "${pid}" 2>/dev/null; then
    kill -TERM "${pid}" 2>/dev/null || true
    for i in $(seq 1 40); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "${pid}" 2>/dev/null || true
  fi
  rm -f "${pidf}"
}

# ---- PKI ---------------------------------------------------------------------------------------
# cert NAME CN O [SANS]: a client/server certificate signed by the cluster CA.
cert() {
  local name="$1" cn="$2" org="$3" sans="${4:-}" d="${STATE}/pki"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$d/${name}.key" -subj "/CN=${cn}${org:+/O=${org}}" \
    -out "$d/${name}.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [[ -n "${sans}" ]] && echo "subjectAltName=${sans}"
  } > "$d/${name}.ext"
  openssl x509 -req -in "$d/${name}.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
    -sha256 -extfile "$d/${name}.ext" -out "$d/${name}.crt" 2>/dev/null
  rm -f "$d/${name}.csr" "$d/${name}.ext"
}

kubeconfig() {  # kubeconfig NAME USER: a kubeconfig for the certificate NAME
  local d="${STATE}/pki"
  cat > "$d/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: bloodcnn-local
  cluster: {certificate-authority: $d/ca.crt, server: "https://${NODE_IP}:6443"}
users:
- name: $2
  user: {client-certificate: $d/$1.crt, client-key: $d/$1.key}
contexts:
- name: bloodcnn-local
  context: {cluster: bloodcnn-local, user: $2}
current-context: bloodcnn-local
EOF
}

make_pki() {
  local d="${STATE}/pki"
  mkdir -p "$d" && chmod 700 "$d"
  openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$d/ca.key" -subj "/CN=bloodcnn-local-ca" \
    -days 30 -sha256 -out "$d/ca.crt" 2>/dev/null
  cert apiserver kube-apiserver "" \
    "IP:${NODE_IP},IP:${API_SERVICE_IP},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert admin bloodcnn-admin system:masters
  cert controller-manager system:kube-controller-manager ""
  cert scheduler system:kube-scheduler ""
  cert kube-proxy system:kube-proxy ""
  cert kubelet "system:node:${NODE_NAME}" system:nodes "IP:${NODE_IP},DNS:${NODE_NAME}"
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  kubeconfig admin bloodcnn-admin
  kubeconfig controller-manager system:kube-controller-manager
  kubeconfig scheduler system:kube-scheduler
  kubeconfig kube-proxy system:kube-proxy
  kubeconfig kubelet "system:node:${NODE_NAME}"
}

# ---- host changes ------------------------------------------------------------------------------
save_host_state() {
  local s
  : > "${STATE}/host-sysctls"
  for s in "${HOST_SYSCTLS[@]}"; do
    printf '%s=%s\n' "$s" "$(sysctl -n "$s" 2>/dev/null || echo '')" >> "${STATE}/host-sysctls"
  done
  # Directories the runtime or the kubelet creates at fixed paths; only these are removed later.
  : > "${STATE}/host-created"
  for s in /var/lib/kubelet /var/lib/containerd /var/log/pods /var/log/containers /run/containerd /var/lib/cni \
      /etc/cni /opt/cni /run/netns /run/kubelet /var/run/kubernetes; do
    [[ -e "$s" ]] || echo "$s" >> "${STATE}/host-created"
  done
}

restore_host_state() {
  local line key want
  if [[ -f "${STATE}/host-sysctls" ]]; then
    while IFS='=' read -r key want; do
      [[ -n "${want}" ]] || continue
      [[ "$(sysctl -n "${key}" 2>/dev/null)" == "${want}" ]] || sysctl -q -w "${key}=${want}" >/dev/null 2>&1 || true
    done < "${STATE}/host-sysctls"
  fi
  if [[ -f "${STATE}/host-created" ]]; then
    while read -r line; do
      [[ -n "${line}" && -e "${line}" ]] || continue
      if [[ "${line}" == /run/netns ]]; then
        # ip netns add bind-mounts /run/netns on itself: undo that too once no namespace is left
        if [[ -z "$(ls -A /run/netns 2>/dev/null)" ]]; then
          mountpoint -q /run/netns && { umount /run/netns 2>/dev/null || true; }
          rmdir /run/netns 2>/dev/null || true
        fi
      else
        rm -rf "${line}"
      fi
    done < "${STATE}/host-created"
  fi
}

make_netns() {
  ip netns add "${NETNS}"
  ip link add "${HOST_IF}" type veth peer name "${NODE_IF}"
  ip link set "${NODE_IF}" netns "${NETNS}"
  ip addr add "${HOST_IP}/30" dev "${HOST_IF}"
  ip link set "${HOST_IF}" up
  in_ns ip link set lo up
  in_ns ip addr add "${NODE_IP}/30" dev "${NODE_IF}"
  in_ns ip link set "${NODE_IF}" up
  # The host reaches Services and pods through the node (the project's own test hosts).
  ip route add "${SERVICE_CIDR}" via "${NODE_IP}" dev "${HOST_IF}"
  ip route add "${CLUSTER_CIDR}" via "${NODE_IP}" dev "${HOST_IF}"
  # Pods reach Services through kube-proxy's iptables rules in this namespace only.
  in_ns sysctl -q -w net.ipv4.ip_forward=1
  in_ns sysctl -q -w net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
}

# ---- configuration -----------------------------------------------------------------------------
write_configs() {
  mkdir -p "${STATE}"/{etc,cni/net.d,cni/ipam,etcd,kubelet,pod-logs,containerd}
  cat > "${STATE}/etc/containerd.toml" <<EOF
version = 2
root = "${STATE}/containerd/root"
state = "${STATE}/containerd/state"
[grpc]
  address = "${STATE}/containerd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "${STATE}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${PAUSE_IMAGE}"
  # oom_score_adj below the current one needs CAP_SYS_RESOURCE, which this sandbox lacks.
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "${STATE}/cni/net.d"
EOF
  cat > "${STATE}/cni/net.d/10-bloodcnn.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "bloodcnn",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "${POD_CIDR}"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "${STATE}/cni/ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  : > "${STATE}/etc/resolv.conf"   # pods with dnsPolicy Default: no resolver outside the cluster
  cat > "${STATE}/etc/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: ${STATE}/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: ${STATE}/pki/kubelet.crt
tlsPrivateKeyFile: ${STATE}/pki/kubelet.key
address: ${NODE_IP}
healthzBindAddress: 127.0.0.1
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://${STATE}/containerd/containerd.sock
clusterDomain: cluster.local
clusterDNS: [${DNS_IP}]
resolvConf: ${STATE}/etc/resolv.conf
podCIDR: ${POD_CIDR}
podLogsDir: ${STATE}/pod-logs
failSwapOn: false
protectKernelDefaults: false
serializeImagePulls: false
# The images are imported, never pulled: never garbage-collect them, and no disk-based eviction
# on a shared developer disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "200Mi", nodefs.available: "1%", imagefs.available: "1%"}
maxPods: 60
EOF
  cat > "${STATE}/etc/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: ${STATE}/pki/kube-proxy.kubeconfig}
hostnameOverride: ${NODE_NAME}
bindAddress: ${NODE_IP}
clusterCIDR: ${CLUSTER_CIDR}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the host's conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
# SNAT Service traffic so replies between pods on one bridge come back through the rules.
iptables: {masqueradeAll: true}
EOF
}

# ---- images ------------------------------------------------------------------------------------
# scratch_image NAME BINARY TAG: a one-binary image (docker-archive in the cache), built with buildah.
scratch_image() {
  local name="$1" bin="$2" ref tar
  ref="localhost/bloodcnn/${name}"
  tar="${K8S_CACHE}/images/${name}-$(sha256sum "${bin}" | cut -c1-12).tar"
  if [[ -s "${tar}" && -s "${tar}.sha256" ]] && (cd "$(dirname "${tar}")" && sha256sum --quiet --status -c "${tar}.sha256"); then
    echo "${tar}"; return
  fi
  mkdir -p "${K8S_CACHE}/images"
  local c; c="$(buildah from scratch)"
  buildah copy --quiet "$c" "${bin}" "/${name}" >/dev/null
  buildah config --entrypoint "[\"/${name}\"]" --user 65532:65532 "$c"
  buildah commit --quiet "$c" "${ref}:${3}" >/dev/null
  buildah rm "$c" >/dev/null
  rm -f "${tar}" && podman save --quiet --format docker-archive -o "${tar}" "${ref}:${3}"
  (cd "$(dirname "${tar}")" && sha256sum "$(basename "${tar}")" > "${tar}.sha256")
  echo "${tar}"
}

ctr_import() {  # ctr_import TARBALL
  in_ns ctr --address "${STATE}/containerd/containerd.sock" -n k8s.io images import --no-unpack "$1" >/dev/null
}

# ---- up ----------------------------------------------------------------------------------------
cmd_up() {
  [[ "$(id -u)" == 0 ]] || die "the local cluster needs root (network namespace, containerd, kubelet)"
  if [[ -e "/run/netns/${NETNS}" ]]; then
    if alive kube-apiserver && alive kubelet; then say "cluster already up"; cmd_env; return; fi
    say "a previous cluster was left half-up: taking it down first"
    cmd_down
  fi
  local t0=${SECONDS}
  say "prerequisites (Debian packages, Go)"
  bash "${HERE}/prereqs.sh"
  say "Kubernetes ${KUBERNETES_VERSION}, KubeRay ${KUBERAY_VERSION}, CoreDNS ${COREDNS_VERSION}: built once, cached in ${K8S_CACHE}"
  bash "${HERE}/build.sh" all
  local kuberay_ver="${KUBERAY_VERSION}"
  [[ -x "${K8S_CACHE}/kuberay-${kuberay_ver}/bin/kuberay-operator" ]] || kuberay_ver="${KUBERAY_FALLBACK_VERSION}"
  local kuberay_bin="${K8S_CACHE}/kuberay-${kuberay_ver}/bin/kuberay-operator"
  local pause_tar coredns_tar kuberay_tar
  pause_tar="$(scratch_image pause "${K8S_CACHE}/pause-${KUBERNETES_VERSION}/bin/pause" "${KUBERNETES_VERSION}")"
  coredns_tar="$(scratch_image coredns "${K8S_CACHE}/coredns-${COREDNS_VERSION}/bin/coredns" "${COREDNS_VERSION}")"
  kuberay_tar="$(scratch_image kuberay-operator "${kuberay_bin}" "${kuberay_ver}")"

  say "starting the cluster in network namespace ${NETNS} (state ${STATE})"
  mkdir -p "${STATE}"/{logs,pids}
  save_host_state
  make_netns
  make_pki
  write_configs

  start etcd etcd --name bloodcnn --data-dir "${STATE}/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster bloodcnn=http://127.0.0.1:2380 --log-level warn
  start containerd containerd --config "${STATE}/etc/containerd.toml"
  wait_for 30 "etcd" in_ns curl -sf http://127.0.0.1:2379/health
  local d="${STATE}/pki"
  start kube-apiserver "$(k8s_bin kube-apiserver)" \
    --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 --secure-port=6443 \
    --advertise-address="${NODE_IP}" --service-cluster-ip-range="${SERVICE_CIDR}" \
    --tls-cert-file="$d/apiserver.crt" --tls-private-key-file="$d/apiserver.key" --client-ca-file="$d/ca.crt" \
    --kubelet-client-certificate="$d/apiserver-kubelet-client.crt" --kubelet-client-key="$d/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$d/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$d/sa.pub" --service-account-signing-key-file="$d/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=false --profiling=false --v=1
  wait_for 90 "the API server" kc get --raw /readyz
  start kube-controller-manager "$(k8s_bin kube-controller-manager)" \
    --kubeconfig="$d/controller-manager.kubeconfig" --authentication-kubeconfig="$d/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$d/controller-manager.kubeconfig" --bind-address=127.0.0.1 \
    --cluster-signing-cert-file="$d/ca.crt" --cluster-signing-key-file="$d/ca.key" \
    --root-ca-file="$d/ca.crt" --service-account-private-key-file="$d/sa.key" \
    --use-service-account-credentials=true --leader-elect=false --profiling=false --v=1
  start kube-scheduler "$(k8s_bin kube-scheduler)" \
    --kubeconfig="$d/scheduler.kubeconfig" --authentication-kubeconfig="$d/scheduler.kubeconfig" \
    --authorization-kubeconfig="$d/scheduler.kubeconfig" --bind-address=127.0.0.1 --leader-elect=false --v=1
  wait_for 30 "containerd" in_ns ctr --address "${STATE}/containerd/containerd.sock" version
  local tar
  for tar in "${pause_tar}" "${coredns_tar}" "${kuberay_tar}"; do ctr_import "${tar}"; done
  start kubelet "$(k8s_bin kubelet)" --config="${STATE}/etc/kubelet.yaml" \
    --kubeconfig="$d/kubelet.kubeconfig" --root-dir="${STATE}/kubelet" \
    --hostname-override="${NODE_NAME}" --node-ip="${NODE_IP}" --v=1
  start kube-proxy "$(k8s_bin kube-proxy)" --config="${STATE}/etc/kube-proxy.yaml" --v=1
  wait_for 120 "node ${NODE_NAME} Ready" kc wait --for=condition=Ready "node/${NODE_NAME}" --timeout=2s

  say "cluster add-ons: CoreDNS ${COREDNS_VERSION}, KubeRay CRDs (v1.7.0 schemas), KubeRay operator ${kuberay_ver}"
  kc apply --server-side -f "${KUBERAY_CRDS}" >/dev/null
  sed -e "s|@DNS_IP@|${DNS_IP}|g" -e "s|@COREDNS_IMAGE@|localhost/bloodcnn/coredns:${COREDNS_VERSION}|g" \
    "${HERE}/manifests/coredns.yaml" | kc apply -f - >/dev/null
  kc apply -f "${K8S_CACHE}/kuberay-${kuberay_ver}/role.yaml" >/dev/null
  sed -e "s|@KUBERAY_IMAGE@|localhost/bloodcnn/kuberay-operator:${kuberay_ver}|g" \
    "${HERE}/manifests/kuberay-operator.yaml" | kc apply -f - >/dev/null
  kc wait --for=condition=Established crd/rayclusters.ray.io crd/rayjobs.ray.io crd/rayservices.ray.io --timeout=60s >/dev/null
  wait_for 180 "CoreDNS ready" kc -n kube-system rollout status deployment/coredns --timeout=2s
  wait_for 180 "the KubeRay operator ready" kc -n kuberay-system rollout status deployment/kuberay-operator --timeout=2s
  say "cluster up in $((SECONDS - t0)) s: Kubernetes ${KUBERNETES_VERSION}, KubeRay ${kuberay_ver}, node ${NODE_NAME} (${NODE_IP})"
  cmd_env
}

# ---- down --------------------------------------------------------------------------------------
cmd_down() {
  [[ "$(id -u)" == 0 ]] || die "needs root"
  say "stopping the local cluster"
  local p
  # The kubelet first, so that it restarts nothing; then every container, then the daemons.
  stop_proc kube-proxy; stop_proc kubelet
  if [[ -S "${STATE}/containerd/containerd.sock" ]] && alive containerd; then
    local c
    for c in $(in_ns ctr --address "${STATE}/containerd/containerd.sock" -n k8s.io tasks list -q 2>/dev/null); do
      in_ns ctr --address "${STATE}/containerd/containerd.sock" -n k8s.io tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
    done
  fi
  for p in kube-scheduler kube-controller-manager kube-apiserver containerd etcd; do stop_proc "$p"; done
  # Shims (and anything they still run) outlive containerd by design: end them too.
  local pids
  pids="$(pgrep -f "containerd-shim.*-address ${STATE}/" || true)"
  if [[ -n "${pids}" ]]; then
    local shim
    for shim in ${pids}; do pkill -KILL -P "${shim}" 2>/dev/null || true; kill -KILL "${shim}" 2>/dev/null || true; done
  fi
  # Anything else still in the namespace (pod processes are in theirs, under the shims).
  if [[ -e "/run/netns/${NETNS}" ]]; then
    for p in $(ip netns pids "${NETNS}" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  fi
  # Mounts: overlay rootfs, service-account token tmpfs, pod shm and netns bind mounts.
  local m
  for m in $(awk -v s="${STATE}" -v r="/run/containerd" '$2 ~ "^"s || $2 ~ "^"r {print $2}' /proc/self/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  # Pod network namespaces the CNI left (containerd names them cni-*).
  for m in /run/netns/cni-*; do [[ -e "$m" ]] && { ip netns delete "$(basename "$m")" 2>/dev/null || true; }; done
  # cgroups the kubelet made (cgroupfs driver): kubepods under every controller, deepest first.
  find /sys/fs/cgroup -depth -type d -name 'kubepods*' 2>/dev/null | while read -r m; do
    find "$m" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  ip link delete "${HOST_IF}" 2>/dev/null || true
  [[ -e "/run/netns/${NETNS}" ]] && ip netns delete "${NETNS}"
  restore_host_state
  rm -rf "${STATE}"
  say "local cluster down"
}

# ---- status ------------------------------------------------------------------------------------
cmd_status() {
  if [[ ! -e "/run/netns/${NETNS}" ]]; then echo "local cluster: down"; return 3; fi
  local p rc=0
  echo "local cluster: network namespace ${NETNS}, node ${NODE_NAME} (${NODE_IP}), state ${STATE}"
  for p in "${PROCS[@]}"; do
    if alive "$p"; then printf '  %-24s running (pid %s)\n' "$p" "$(cat "${STATE}/pids/$p")"
    else printf '  %-24s NOT running (log: %s)\n' "$p" "${STATE}/logs/$p.log"; rc=1; fi
  done
  if kc get --raw /readyz >/dev/null 2>&1; then
    echo "  API server https://${NODE_IP}:6443: $(kc version -o json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
    kc get nodes --no-headers 2>/dev/null | sed 's/^/  node /'
    kc get pods -A --no-headers 2>/dev/null | awk '{printf "  pod %s/%s %s %s\n", $1, $2, $3, $4}'
  else
    echo "  API server: not answering"; rc=1
  fi
  return "${rc}"
}

cmd_env() {
  echo "export KUBECONFIG=${KUBECONFIG_ADMIN}"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  exec) shift; in_ns "$@" ;;
  *) echo "usage: $0 up|down|status|env|exec CMD..." >&2; exit 2 ;;
esac
