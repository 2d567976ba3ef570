"""Helpers for the local-Kubernetes end-to-end test: kubectl/helm against the cluster of
``k8s/local-cluster.sh``, polling with diagnostics, and a snapshot of what the cluster may
change on the host (to prove that ``down`` undoes it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from conftest import REPO
from helm_support import helm_binary

CLUSTER_SCRIPT = REPO / "k8s" / "local-cluster.sh"
IMAGE_SCRIPT = REPO / "k8s" / "local" / "image.sh"
STATE = Path(os.environ.get("BLOODCNN_K8S_STATE", "/var/lib/bloodcnn-k8s"))
KUBECONFIG = STATE / "pki" / "admin.kubeconfig"
NETNS = os.environ.get("BLOODCNN_K8S_NETNS", "bloodcnn-k8s")
CHART = REPO / "helm"
LOCAL_VALUES = REPO / "helm" / "ci" / "local-values.yaml"
KUBECTL = REPO / ".venv" / "bin" / "kubectl"


def run(cmd: list[str | Path], timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    """Run a command, capturing text; a failure names the command and shows its output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def kubectl(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return run([KUBECTL, "--kubeconfig", KUBECONFIG, *args], timeout=timeout, check=check)


def kjson(*args: str) -> dict:
    return json.loads(kubectl(*args, "-o", "json").stdout)


def helm(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    return run([helm_binary(), "--kubeconfig", KUBECONFIG, *args], timeout=timeout, check=check)


def diagnostics(namespace: str) -> str:
    """What explains a failure: pod statuses, recent events, the Ray resources and the last
    log lines of every container that is not running well."""
    out = []

    def section(title: str, *args: str) -> None:
        proc = kubectl(*args, check=False, timeout=60)
        out.append(f"---- {title}\n{proc.stdout}{proc.stderr}")

    section("pods", "-n", namespace, "get", "pods", "-o", "wide")
    section("ray resources", "-n", namespace, "get", "rayservice,rayjob,raycluster,jobs", "-o", "wide")
    section("events", "-n", namespace, "get", "events", "--sort-by=.lastTimestamp")
    section("rayservice status", "-n", namespace, "get", "rayservice", "-o", "jsonpath={.items[*].status}")
    try:
        pods = kjson("-n", namespace, "get", "pods")["items"]
    except (AssertionError, ValueError):
        pods = []
    for pod in pods:
        statuses = pod.get("status", {}).get("containerStatuses", []) + pod.get("status", {}).get("initContainerStatuses", [])
        unhealthy = pod["status"].get("phase") not in ("Running", "Succeeded") or any(
            not s.get("ready") and "terminated" not in s.get("state", {}) or s.get("restartCount", 0) for s in statuses)
        if not unhealthy:
            continue
        name = pod["metadata"]["name"]
        for s in statuses:
            section(f"logs {name}/{s['name']}", "-n", namespace, "logs", name, "-c", s["name"], "--tail=40")
            if s.get("restartCount"):
                section(f"previous logs {name}/{s['name']}", "-n", namespace, "logs", name, "-c", s["name"],
                        "--previous", "--tail=40")
    return "\n".join(out)[-20000:]


class Fatal(Exception):
    """Raised by a wait condition when waiting longer cannot help (a Job or RayJob failed)."""


def wait_until(what: str, cond: Callable[[], Any], timeout: float, namespace: str | None = None,
               interval: float = 3, fail_fast: Callable[[], str | None] | None = None) -> Any:
    """Poll ``cond`` until it returns something truthy; on timeout (or when ``fail_fast``
    returns a reason) fail with the cluster's diagnostics."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Fatal as exc:
            raise AssertionError(f"{what}: {exc}\n" + (diagnostics(namespace) if namespace else "")) from None
        # httpx.TransportError: a Service with no ready endpoints yet is REJECTed by kube-proxy
        # (ENETUNREACH / ECONNREFUSED) for a moment after the RayService turns Ready
        except (AssertionError, subprocess.SubprocessError, ValueError, KeyError, OSError,
                httpx.TransportError) as exc:
            last_error = exc
        if fail_fast and (reason := fail_fast()):
            raise AssertionError(f"{what}: {reason}\n" + (diagnostics(namespace) if namespace else ""))
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})\n"
                         + (diagnostics(namespace) if namespace else ""))


# ---- the host, before and after -----------------------------------------------------------------
# sysctls that change by themselves (counters, entropy, pids), not by anything the cluster does.
_VOLATILE_SYSCTL = re.compile(
    r"^(kernel\.random\.|kernel\.ns_last_pid|kernel\.pty\.nr|fs\.(dentry|inode|file|aio)-|fs\.(dentry|inode)-state|"
    r"fs\.quota\.|net\.netfilter\.nf_conntrack_count|kernel\.tainted|vm\.stat_refresh|kernel\.sched_domain|"
    r"net\.ipv4\.tcp_mem|net\.ipv4\.udp_mem|kernel\.perf_event_max_sample_rate|vm\.nr_pdflush|fs\.overflow|"
    r"kernel\.keys\.(maxbytes|maxkeys)$)")
CLUSTER_PROCESSES = ("etcd", "containerd", "containerd-shim", "kube-apiserver", "kube-controller",
                     "kube-scheduler", "kubelet", "kube-proxy", "coredns", "kuberay-operato", "pause")


def host_snapshot() -> dict[str, Any]:
    sysctls = {}
    for line in run(["sysctl", "-a"], check=False).stdout.splitlines():
        key, _, value = line.partition(" = ")
        if key and not _VOLATILE_SYSCTL.match(key):
            sysctls[key] = value
    iptables = [line for line in run(["iptables-save"], check=False).stdout.splitlines()
                if line and not line.startswith("#")]
    return {
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else [],
        "links": sorted(line.split(":")[1].strip().split("@")[0]
                        for line in run(["ip", "-o", "link", "show"]).stdout.splitlines()),
        "routes": sorted(run(["ip", "route", "show"]).stdout.splitlines()),
        "iptables": [re.sub(r"\[\d+:\d+\]", "", line) for line in iptables],
        "sysctls": sysctls,
        "mounts": sorted({line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()}),
        "processes": cluster_processes(),
        "paths": sorted(p for p in (str(STATE), "/var/log/pods", "/var/log/containers", "/run/containerd",
                                    "/var/lib/cni", "/var/lib/kubelet", "/var/lib/containerd") if os.path.exists(p)),
    }


def cluster_processes() -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(CLUSTER_PROCESSES):
            found.append(comm)
    return sorted(found)


def snapshot_diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    diff: dict[str, Any] = {}
    for key in before:
        a, b = before[key], after[key]
        if key == "sysctls":
            changed = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
            if changed:
                diff[key] = changed
        elif a != b:
            diff[key] = {"added": sorted(set(b) - set(a)), "removed": sorted(set(a) - set(b))}
    return diff
