#!/usr/bin/env bash
# Fresh machine -> passing tests. The tests start their own SeaweedFS S3 and Ray clusters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"
