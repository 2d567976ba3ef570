#!/usr/bin/env bash
# A local Kubernetes from real parts (no Docker): up | down | status | env | exec CMD.
# See k8s/local/cluster.sh and docs/kubernetes.md ("A local cluster without Docker").
exec bash "$(dirname "${BASH_SOURCE[0]}")/local/cluster.sh" "$@"
