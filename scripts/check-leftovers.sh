#!/usr/bin/env bash
# After the test suite (CI's last step): fail if a SeaweedFS (weed), Ray GCS (gcs_server),
# raylet, Serve's HAProxy or Ray worker/agent process that the tests started is still running.
#
# "Started by the tests" means: its environment carries the BLOODCNN_TEST_SESSION value that
# scripts/test.sh exported (and wrote to out/test-session). Everything the tests start inherits
# it, also processes re-parented to init after their parent died; processes of anyone else on
# the machine (another engineer's Ray, a local Kubernetes cluster in a network namespace) lack it
# and are never flagged. Processes still exiting get GRACE seconds (default 15).
#
# Usage: scripts/check-leftovers.sh [SESSION]
set -euo pipefail
cd "$(dirname "$0")/.."
session="${1:-$(cat out/test-session 2>/dev/null || true)}"
if [ -z "$session" ]; then
  echo "check-leftovers: no test session (out/test-session is written by scripts/test.sh)" >&2
  exit 2
fi
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
PYTHONPATH=platform exec "$PY" - "$session" "${GRACE:-15}" <<'PY'
import sys, time
from bloodcnn import procs

session, grace = sys.argv[1], float(sys.argv[2])
RAY_SCRIPTS = ("ray/_private/workers/default_worker.py", "ray/dashboard/", "ray/_private/log_monitor.py",
               "ray/autoscaler/_private/monitor.py", "ray/_private/runtime_env/agent/")

def is_server(p):
    if p.name in ("weed", "raylet", "gcs_server", "haproxy") or p.name.startswith("ray::"):
        return True
    return any(s in procs.cmdline(p.pid) for s in RAY_SCRIPTS)

deadline = time.monotonic() + grace
while True:
    left = [p for p in procs.tagged("BLOODCNN_TEST_SESSION", session) if is_server(p)]
    if not left or time.monotonic() > deadline:
        break
    time.sleep(1)
if left:
    print(f"check-leftovers: {len(left)} process(es) started by the tests (session {session}) still run:")
    for p in left:
        print("  " + procs.describe(p, 110))
    sys.exit(1)
print(f"check-leftovers: no weed, raylet, gcs_server or Ray worker left by the tests (session {session})")
PY
