#!/usr/bin/env bash
# Set up a fresh machine: Python venv with the pinned project, Chromium for the browser test,
# Helm 4 for the chart checks. Prints only its own lines; the tools' output goes to
# .venv/setup.log (shown when a step fails). Idempotent: when pyproject.toml is unchanged since
# the last install (a stamp of its hash in .venv), a second run only checks and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, found {sys.version}"' \
  2>/dev/null || { echo "error: bloodcnn needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

LOG=.venv/setup.log
step() {  # step "what" command...: run quietly, show the log's tail if it fails
  local what=$1; shift
  if ! "$@" >>"$LOG" 2>&1; then
    echo "error: $what failed; the last lines of $LOG:" >&2
    tail -n 25 "$LOG" >&2
    exit 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
: >"$LOG"

stamp=.venv/.bloodcnn-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])')"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -x .venv/bin/bloodcnn ]; then
  echo "==> bloodcnn and its pinned dependencies: up to date"
else
  echo "==> installing bloodcnn and its pinned dependencies"
  rm -f "$stamp"
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_WARN_SCRIPT_LOCATION=1
  step "pip upgrade" .venv/bin/python -m pip install -q --upgrade pip
  step "pip install" .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" >"$stamp"
fi

if [ "${BLOODCNN_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing Debian chromium for the web page test"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  step "apt-get update" $SUDO apt-get update -qq
  step "apt-get install chromium" env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi

if [ -f scripts/get-helm.sh ]; then
  step "Helm 4 install (scripts/get-helm.sh)" bash scripts/get-helm.sh
fi
echo "==> setup done"
