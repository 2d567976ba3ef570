#!/usr/bin/env bash
# Fresh machine -> the whole flow on embedded defaults: local S3 + Ray, data, training, serving.
set -euo pipefail
cd "$(dirname "$0")/.."
BLOODCNN_SKIP_BROWSER=1 bash scripts/setup.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python jobs/main.py "$@"
