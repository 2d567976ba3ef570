"""One small storage interface for local paths and ``s3://bucket/prefix`` URIs.

Why: every stage reads and writes the same way whether data sits on a laptop disk, AWS S3,
MinIO or SeaweedFS. Endpoint, region and credentials come from the standard AWS chain
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws/config``, IRSA, ...), retries from
botocore's retry config, and large objects go up with boto3's multipart transfer manager.
Writes are atomic: a reader never sees half an object.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from bloodcnn.config import StorageConfig

MB = 1024 * 1024
_CREDENTIAL_CODES = {"403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and never holds a secret."""


class ObjectNotFound(StorageError, FileNotFoundError):
    pass


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI or path parts with '/' (works for both local paths and s3://)."""
    out = str(base).rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"not a valid s3 URI (no bucket): {uri!r}")
    return bucket, key


class LocalStore:
    """Plain files; atomic writes through a temporary file and os.replace."""

    def read_bytes(self, uri: str) -> bytes:
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"not found: {uri}") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def upload_file(self, local_path: str | Path, uri: str) -> None:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            import shutil

            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def download_file(self, uri: str, local_path: str | Path) -> None:
        if not Path(uri).is_file():
            raise ObjectNotFound(f"not found: {uri}")
        self.upload_file(uri, local_path)

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def size(self, uri: str) -> int:
        try:
            return Path(uri).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"not found: {uri}") from None

    def list(self, prefix: str) -> Iterator[str]:
        """Every file under the folder ``prefix``, recursively, sorted."""
        root = Path(prefix)
        if not root.is_dir():
            return iter(())
        return iter(sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")))

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)

    def ensure_container(self, uri: str) -> None:
        Path(uri).mkdir(parents=True, exist_ok=True)


@dataclass(repr=False)
class S3Store:
    """S3 through boto3. Its repr names the endpoint only: credentials stay in botocore."""

    config: StorageConfig

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self.endpoint or 'aws-default'})"

    @functools.cached_property
    def client(self):
        cfg = Config(
            retries={"max_attempts": self.config.max_attempts, "mode": self.config.retry_mode},
            connect_timeout=self.config.connect_timeout_s,
            read_timeout=self.config.read_timeout_s,
            max_pool_connections=max(10, self.config.max_concurrency * 2),
        )
        return boto3.session.Session().client("s3", config=cfg)

    @property
    def endpoint(self) -> str:
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""

    @functools.cached_property
    def transfer_config(self) -> TransferConfig:
        return TransferConfig(
            multipart_threshold=self.config.multipart_threshold_mb * MB,
            multipart_chunksize=self.config.multipart_chunksize_mb * MB,
            max_concurrency=self.config.max_concurrency,
        )

    def _error(self, exc: Exception, uri: str, op: str) -> StorageError:
        where = f"{op} {uri}" + (f" at {self.endpoint}" if self.endpoint else "")
        if isinstance(exc, NoCredentialsError):
            return StorageError(f"{where}: no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
        if isinstance(exc, EndpointConnectionError):
            return StorageError(f"{where}: cannot reach the S3 endpoint (is the server running and AWS_ENDPOINT_URL right?)")
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _CREDENTIAL_CODES:
                key_id = os.environ.get("AWS_ACCESS_KEY_ID", "")
                hint = f" for access key id ...{key_id[-4:]}" if len(key_id) >= 8 else ""
                return StorageError(f"{where}: S3 rejected the credentials{hint} ({code}); check the secret key")
            if code in _MISSING_CODES:
                return ObjectNotFound(f"{where}: not found")
            if code == "NoSuchBucket":
                return StorageError(f"{where}: bucket does not exist")
            return StorageError(f"{where}: S3 error {code}")
        if isinstance(exc, BotoCoreError):
            return StorageError(f"{where}: {type(exc).__name__}: {exc}")
        return StorageError(f"{where}: {exc}")

    def _call(self, op: str, uri: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, uri, op) from None

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        resp = self._call("read", uri, self.client.get_object, Bucket=bucket, Key=key)
        return self._call("read", uri, resp["Body"].read)

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        self._call("write", uri, self.client.put_object, Bucket=bucket, Key=key, Body=data)

    def upload_file(self, local_path: str | Path, uri: str) -> None:
        bucket, key = split_s3(uri)
        self._call("upload", uri, self.client.upload_file, str(local_path), bucket, key, Config=self.transfer_config)

    def download_file(self, uri: str, local_path: str | Path) -> None:
        """Download to a temporary name first so a failed transfer leaves no file."""
        bucket, key = split_s3(uri)
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local_path.parent, prefix=f".{local_path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            self._call("download", uri, self.client.download_file, bucket, key, tmp, Config=self.transfer_config)
            os.replace(tmp, local_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self._call("stat", uri, self.client.head_object, Bucket=bucket, Key=key)
            return True
        except ObjectNotFound:
            return False

    def size(self, uri: str) -> int:
        bucket, key = split_s3(uri)
        return int(self._call("stat", uri, self.client.head_object, Bucket=bucket, Key=key)["ContentLength"])

    def list(self, prefix: str) -> Iterator[str]:
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                for obj in page.get("Contents", []):
                    yield f"s3://{bucket}/{obj['Key']}"
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, prefix, "list") from None

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        self._call("delete", uri, self.client.delete_object, Bucket=bucket, Key=key)

    def ensure_container(self, uri: str) -> None:
        """Create the bucket if it is missing (SeaweedFS/MinIO dev setups start empty)."""
        bucket, _ = split_s3(uri)
        try:
            self._call("head bucket", f"s3://{bucket}", self.client.head_bucket, Bucket=bucket)
        except ObjectNotFound:
            self._call("create bucket", f"s3://{bucket}", self.client.create_bucket, Bucket=bucket)
        except StorageError as exc:
            if "bucket does not exist" not in str(exc):
                raise
            self._call("create bucket", f"s3://{bucket}", self.client.create_bucket, Bucket=bucket)


Store = LocalStore | S3Store


@functools.lru_cache(maxsize=8)
def _s3_store(cfg_json: str) -> S3Store:
    return S3Store(StorageConfig.model_validate_json(cfg_json))


def store_for(uri: str, config: StorageConfig | None = None) -> Store:
    """The store that serves ``uri``; S3 clients are cached per process and config."""
    if is_s3(uri):
        return _s3_store((config or StorageConfig()).model_dump_json())
    return LocalStore()


def read_bytes(uri: str, config: StorageConfig | None = None) -> bytes:
    return store_for(uri, config).read_bytes(uri)


def write_bytes(uri: str, data: bytes, config: StorageConfig | None = None) -> None:
    store_for(uri, config).write_bytes(uri, data)


def exists(uri: str, config: StorageConfig | None = None) -> bool:
    return store_for(uri, config).exists(uri)
