#!/usr/bin/env bash
# Builds the bloodcnn image from the repository's own Dockerfile without a Docker daemon
# (podman, rootful) and hands it to the local cluster's containerd. Nothing can be pulled here,
# so the base image (what rayproject/ray:2.60.0-py311 gives the Dockerfile: user ray uid 1000 /
# gid 100, HOME /home/ray, python/pip of a Python 3.11 environment writable by that user, bash,
# wget, ca-certificates, procps) is made with debootstrap and imported.
#
#   bash k8s/local/image.sh build    # -> last two stdout lines: image reference, tarball path
#   CONTAINERD_ADDRESS=/run/containerd/containerd.sock bash k8s/local/image.sh import
#   bash k8s/local/image.sh ref      # the reference the current sources would build
#
# Artefacts live in ${BLOODCNN_CACHE}/images, keyed by a hash of their inputs and checked by
# sha256 (the .sha256 is written last): a second run with no change builds nothing.
#   base:  bloodcnn-base-bookworm-py311-<hash12>.tar  (docker-archive; recipe = this file's base_*)
#   image: bloodcnn-dev-<hash12>.tar                  (docker-archive; Dockerfile, .dockerignore,
#          pyproject.toml, README.md, platform/, jobs/, serving/, the base, EXTRA_PIP_PACKAGES)
# Stage lines go to stderr; full logs to ${BLOODCNN_CACHE}/images/logs/.
#
# Environment: BLOODCNN_CACHE, DEBIAN_MIRROR, EXTRA_PIP_PACKAGES, CONTAINERD_ADDRESS,
#   BLOODCNN_IMAGE_KEEP (image tarballs kept, default 2),
#   BLOODCNN_BUILD_CA (host CA bundle bind-mounted over the build's during RUN steps, for
#   TLS-intercepting egress proxies; empty to disable), BLOODCNN_ULIMITS (podman --ulimit list).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"
# shellcheck source=versions.sh
source "${HERE}/versions.sh"

IMAGES_DIR="${BLOODCNN_CACHE}/images"
LOG_DIR="${IMAGES_DIR}/logs"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
EXTRA_PIP_PACKAGES="${EXTRA_PIP_PACKAGES:-}"
BLOODCNN_BUILD_CA="${BLOODCNN_BUILD_CA-/etc/ssl/certs/ca-certificates.crt}"
# This sandbox lacks CAP_SYS_RESOURCE: runc cannot raise rlimits above the host's, so every
# container (build steps included) gets explicit ones at or below them.
read -r -a ULIMITS <<< "${BLOODCNN_ULIMITS:-nofile=1024:1024 nproc=4096:4096}"
PODMAN=(podman --cgroup-manager cgroupfs --runtime runc)
ULIMIT_FLAGS=(); for u in "${ULIMITS[@]}"; do ULIMIT_FLAGS+=(--ulimit "$u"); done

# ------------------------------------------------------------------------------------------
# The base image recipe. Everything below up to base_recipe() feeds the base's hash.
BASE_SUITE=bookworm
BASE_NAME=localhost/bloodcnn-base
BASE_PACKAGES=python3,python3-venv,ca-certificates,wget,procps,netbase,tzdata,less
BASE_PYTHON_TOOLS="pip==25.3 setuptools==80.9.0 wheel==0.45.1"
BASE_CHANGES=(
  "ENV PATH=/home/ray/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  "ENV VIRTUAL_ENV=/home/ray/venv"
  "ENV HOME=/home/ray"
  "ENV LANG=C.UTF-8"
  "ENV LC_ALL=C.UTF-8"
  "USER 1000:100"
  "WORKDIR /home/ray"
  'CMD ["/bin/bash"]'
)

# Runs inside the debootstrapped root (chroot), with BASE_SUITE, DEBIAN_MIRROR and
# BASE_PYTHON_TOOLS in its environment and the tools' wheels in /tmp/wheels.
base_chroot() {
  set -euo pipefail
  export DEBIAN_FRONTEND=noninteractive
  local security="${DEBIAN_MIRROR%/debian}/debian-security"
  cat > /etc/apt/sources.list <<EOF
deb ${DEBIAN_MIRROR} ${BASE_SUITE} main
deb ${DEBIAN_MIRROR} ${BASE_SUITE}-updates main
deb ${security} ${BASE_SUITE}-security main
EOF
  apt-get -q update
  apt-get -q -y upgrade
  apt-get clean
  rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
  # The ray user of rayproject/ray: uid 1000, primary group 100 ("users", from base-passwd).
  getent group users | grep -q ':100:'
  useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray
  # Python 3.11 environment on PATH, writable by the ray user (pip install in the Dockerfile).
  python3 -m venv /home/ray/venv
  # shellcheck disable=SC2086
  /home/ray/venv/bin/pip install -q --no-index --find-links /tmp/wheels ${BASE_PYTHON_TOOLS}
  rm -rf ~root/.cache ~ray/.cache /tmp/wheels  # in the chroot: its root and ray users
  chown -R 1000:100 /home/ray
  python3 --version && /home/ray/venv/bin/python -m pip --version && wget --version | head -1
}

base_recipe() {
  printf '%s\n' "suite=${BASE_SUITE}" "variant=minbase" "arch=$(dpkg --print-architecture)" \
    "packages=${BASE_PACKAGES}" "tools=${BASE_PYTHON_TOOLS}" "${BASE_CHANGES[@]}"
  declare -f base_chroot
}
# ------------------------------------------------------------------------------------------

say() { printf '    %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

LOG="" STAGE_PID=""
# stage "text" CMD...: one console line per stage (text, then "ok (Ns)"); output to $LOG. On
# failure prints the log's path and its last 30 lines.
stage() {
  local text="$1"; shift
  local t0=$SECONDS
  printf '    %s ... ' "$text" >&2
  printf '\n==> %s\n$ %s\n' "$text" "$*" >> "$LOG"
  # In the background, not as an `if` condition, so that errexit still holds inside functions.
  "$@" >> "$LOG" 2>&1 &
  STAGE_PID=$!
  local rc=0; wait "$STAGE_PID" || rc=$?
  STAGE_PID=""
  if ((rc == 0)); then
    printf 'ok (%ss)\n' "$((SECONDS - t0))" >&2
  else
    printf 'FAILED (exit %s after %ss)\n' "$rc" "$((SECONDS - t0))" >&2
    say "log: ${LOG} (last 30 lines:)"
    tail -n 30 "$LOG" | sed 's/^/      | /' >&2
    exit "$rc"
  fi
}

open_log() {
  mkdir -p "$LOG_DIR"
  LOG="${LOG_DIR}/$1.log"
  printf '# %s %s\n' "$(date -u +%FT%TZ)" "$*" > "$LOG"
}

# verified FILE: FILE exists and matches FILE.sha256.
verified() {
  [[ -s "$1" && -s "$1.sha256" ]] && (cd "$(dirname "$1")" && sha256sum --quiet --status -c "$(basename "$1").sha256")
}

# seal FILE: writes FILE.sha256 (last, so an interrupted save never verifies).
seal() {
  (cd "$(dirname "$1")" && sha256sum "$(basename "$1")" > "$(basename "$1").sha256.tmp" \
    && mv "$(basename "$1").sha256.tmp" "$(basename "$1").sha256")
}

# save REF FILE: podman save as a docker-archive (named by REF), then seal.
save_image() {
  rm -f "$2" "$2.sha256" "$2.tmp"
  "${PODMAN[@]}" save --format docker-archive -o "$2.tmp" "$1"
  mv "$2.tmp" "$2"
  seal "$2"
}

BASE_KEY="$(base_recipe | sha256sum | cut -c1-12)"
BASE_REF="${BASE_NAME}:${BASE_SUITE}-py311-${BASE_KEY}"
BASE_TAR="${IMAGES_DIR}/bloodcnn-base-${BASE_SUITE}-py311-${BASE_KEY}.tar"

# The build context, copied as .dockerignore admits it (generated files left out the same way)
# into a private folder first: the hash and the build then see the same files even while
# someone edits the checkout.
CONTEXT_FILES=(Dockerfile .dockerignore pyproject.toml README.md platform jobs serving)
CONTEXT=""
stage_context() {
  CONTEXT="$(mktemp -d "${TMPDIR:-/tmp}/bloodcnn-context.XXXXXX")"
  local f present=()
  for f in "${CONTEXT_FILES[@]}"; do [[ -e "${REPO}/$f" ]] && present+=("$f"); done
  tar -C "$REPO" -cf - --exclude=__pycache__ --exclude='*.py[cod]' --exclude='*.egg-info' \
    --exclude=.pytest_cache --exclude=.ipynb_checkpoints --exclude=.DS_Store "${present[@]}" \
    | tar -C "$CONTEXT" -xf -
}

# app_key: hash of everything that goes into the image: the staged context (contents and
# modes), the base and the build args.
app_key() {
  (
    cd "$CONTEXT"
    printf 'base=%s\nEXTRA_PIP_PACKAGES=%s\n' "$BASE_KEY" "$EXTRA_PIP_PACKAGES"
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    find . -printf '%m %p\n' | LC_ALL=C sort
  ) | sha256sum | cut -c1-12
}

APP_KEY="" APP_REF="" APP_TAR=""
prepare() {
  stage_context
  APP_KEY="$(app_key)"
  APP_REF="localhost/bloodcnn:dev-${APP_KEY}"
  APP_TAR="${IMAGES_DIR}/bloodcnn-dev-${APP_KEY}.tar"
}

# ------------------------------------------------------------------------------------------
ROOTFS=""
cleanup_rootfs() {
  [[ -n "$ROOTFS" && -d "$ROOTFS" ]] || return 0
  if mountpoint -q "${ROOTFS}/proc"; then umount "${ROOTFS}/proc"; fi
  rm -rf --one-file-system "$ROOTFS" "${ROOTFS}.tar"
}
cleanup() {
  # Interrupted mid-stage: stop that stage's process first.
  if [[ -n "$STAGE_PID" ]]; then kill "$STAGE_PID" 2>/dev/null || true; wait "$STAGE_PID" 2>/dev/null || true; fi
  cleanup_rootfs
  if [[ -n "$CONTEXT" ]]; then rm -rf "$CONTEXT"; fi
}
trap cleanup EXIT

debootstrap_base() {
  mkdir -p "${BLOODCNN_CACHE}/debootstrap"
  debootstrap --variant=minbase --include="${BASE_PACKAGES}" \
    --cache-dir="${BLOODCNN_CACHE}/debootstrap" "${BASE_SUITE}" "$ROOTFS" "${DEBIAN_MIRROR}"
}

configure_base() {
  # The base's own pip/setuptools/wheel, fetched by the host's pip (the chroot installs offline).
  mkdir -p "${ROOTFS}/tmp/wheels"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: -d "${ROOTFS}/tmp/wheels" ${BASE_PYTHON_TOOLS}
  cp /etc/resolv.conf "${ROOTFS}/etc/resolv.conf"
  mount -t proc proc "${ROOTFS}/proc"
  chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C \
    BASE_SUITE="$BASE_SUITE" DEBIAN_MIRROR="$DEBIAN_MIRROR" BASE_PYTHON_TOOLS="$BASE_PYTHON_TOOLS" \
    /bin/bash -c "$(declare -f base_chroot); base_chroot"
  umount "${ROOTFS}/proc"
  # Runtime-provided files: podman, containerd and the kubelet mount their own.
  : > "${ROOTFS}/etc/resolv.conf"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "${ROOTFS}/etc/hosts"
  rm -f "${ROOTFS}/etc/hostname"; : > "${ROOTFS}/etc/machine-id"
}

import_base() {
  local changes=() c
  for c in "${BASE_CHANGES[@]}"; do changes+=(--change "$c"); done
  tar --numeric-owner -C "$ROOTFS" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -cf "${ROOTFS}.tar" .
  "${PODMAN[@]}" import "${changes[@]}" --message "debootstrap ${BASE_SUITE} minbase (${BASE_KEY})" \
    "${ROOTFS}.tar" "$BASE_REF"
  rm -f "${ROOTFS}.tar"
  "${PODMAN[@]}" tag "$BASE_REF" "${BASE_NAME}:${BASE_SUITE}-py311"
}

load_base() {
  "${PODMAN[@]}" load -i "$BASE_TAR"
  "${PODMAN[@]}" image exists "$BASE_REF"
  "${PODMAN[@]}" tag "$BASE_REF" "${BASE_NAME}:${BASE_SUITE}-py311"
}

ensure_base() {
  if "${PODMAN[@]}" image exists "$BASE_REF"; then
    if verified "$BASE_TAR"; then say "base ${BASE_REF}: present"
    else stage "base ${BASE_REF}: present, saving ${BASE_TAR}" save_image "$BASE_REF" "$BASE_TAR"; fi
    return
  fi
  if verified "$BASE_TAR"; then
    stage "base ${BASE_REF}: loading ${BASE_TAR}" load_base
    return
  fi
  mkdir -p "$IMAGES_DIR"
  ROOTFS="${IMAGES_DIR}/rootfs-${BASE_KEY}"
  cleanup_rootfs
  stage "base: debootstrap --variant=minbase ${BASE_SUITE}" debootstrap_base
  stage "base: user ray, venv, security updates (chroot)" configure_base
  stage "base: podman import ${BASE_REF}" import_base
  cleanup_rootfs; ROOTFS=""
  stage "base: save ${BASE_TAR}" save_image "$BASE_REF" "$BASE_TAR"
}

build_image() {
  local mounts=()
  # Only during RUN steps (not kept in the image): lets pip trust a TLS-intercepting proxy's CA.
  if [[ -n "$BLOODCNN_BUILD_CA" && -s "$BLOODCNN_BUILD_CA" ]]; then
    mounts+=(--volume "${BLOODCNN_BUILD_CA}:/etc/ssl/certs/ca-certificates.crt:ro")
  fi
  "${PODMAN[@]}" build --network host "${ULIMIT_FLAGS[@]}" "${mounts[@]}" --layers \
    --build-arg BASE_IMAGE="$BASE_REF" --build-arg EXTRA_PIP_PACKAGES="$EXTRA_PIP_PACKAGES" \
    --label "io.bloodcnn.source-hash=${APP_KEY}" \
    -f "${CONTEXT}/Dockerfile" -t "$APP_REF" "$CONTEXT"
}

# prune_images: keeps the newest BLOODCNN_IMAGE_KEEP (default 2) image tarballs (3+ GB each)
# and drops the podman tags of the others; the base and containerd are left alone.
prune_images() {
  local keep="${BLOODCNN_IMAGE_KEEP:-2}" old key n=0
  while read -r old; do
    [[ -n "$old" ]] || continue
    key="$(basename "$old" .tar)"; key="${key#bloodcnn-dev-}"
    rm -f "$old" "$old.sha256"
    "${PODMAN[@]}" rmi "localhost/bloodcnn:dev-${key}" >> "$LOG" 2>&1 || true
    n=$((n + 1))
  done < <(find "$IMAGES_DIR" -maxdepth 1 -name 'bloodcnn-dev-*.tar' -printf '%T@ %p\n' \
             | sort -rn | tail -n +"$((keep + 1))" | cut -d' ' -f2-)
  if ((n > 0)); then say "pruned ${n} older image tarball(s) (BLOODCNN_IMAGE_KEEP=${keep})"; fi
}

cmd_build() {
  open_log build
  [[ -n "$APP_KEY" ]] || prepare
  if verified "$APP_TAR"; then
    say "image ${APP_REF}: cached"
  else
    ensure_base
    if "${PODMAN[@]}" image exists "$APP_REF"; then say "image ${APP_REF}: present in podman"
    else stage "image: podman build ${APP_REF}" build_image; fi
    stage "image: save $(basename "$APP_TAR")" save_image "$APP_REF" "$APP_TAR"
  fi
  prune_images
  say "size $(du -h "$APP_TAR" | cut -f1)"
  printf '%s\n%s\n' "$APP_REF" "$APP_TAR"
}

ctr_() { ctr --address "$CONTAINERD_ADDRESS" -n k8s.io "$@"; }

cmd_import() {
  [[ -n "${CONTAINERD_ADDRESS:-}" ]] || die "set CONTAINERD_ADDRESS to the containerd socket"
  [[ -S "$CONTAINERD_ADDRESS" ]] || die "no containerd socket at ${CONTAINERD_ADDRESS}"
  prepare
  # The reference carries the content hash: if containerd has it, it has this image.
  if [[ -n "$(ctr_ images ls -q "name==${APP_REF}")" ]]; then
    say "containerd ${CONTAINERD_ADDRESS}: ${APP_REF} already there"
  else
    cmd_build > /dev/null
    open_log import
    stage "containerd: ctr images import ${APP_REF}" ctr_ images import --all-platforms "$APP_TAR"
    [[ -n "$(ctr_ images ls -q "name==${APP_REF}")" ]] \
      || die "${APP_REF} not in containerd (k8s.io) after import; log: ${LOG}"
  fi
  printf '%s\n%s\n' "$APP_REF" "$APP_TAR"
}

case "${1:-}" in
  build) cmd_build ;;
  import) cmd_import ;;
  ref) prepare; printf '%s\n' "$APP_REF" ;;
  *) echo "usage: $0 build|import|ref" >&2; exit 2 ;;
esac
