#!/usr/bin/env bash
# Fresh machine -> passing tests. The tests start their own SeaweedFS S3 and Ray clusters.
# Everything they start carries BLOODCNN_TEST_SESSION (also in out/test-session), which
# scripts/check-leftovers.sh uses afterwards to find processes the tests left running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
export BLOODCNN_TEST_SESSION="${BLOODCNN_TEST_SESSION:-$(date +%Y%m%d%H%M%S)-$$-$RANDOM}"
mkdir -p out && echo "$BLOODCNN_TEST_SESSION" >out/test-session
exec .venv/bin/python -m pytest "$@"
