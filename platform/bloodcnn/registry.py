"""Model registry on storage (local or S3).

Layout: ``<uri>/<model_name>/<version>/`` holds ``model.keras`` and its report files;
``metadata.json`` is written last, so a version without it is incomplete and invisible.
``<uri>/<model_name>/production`` is a small JSON pointer replaced in one PUT (atomic on
S3 and, through os.replace, on disk). The model file's sha256 is recorded and checked on
every fetch, so a corrupted or swapped file is refused rather than served.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from bloodcnn import storage
from bloodcnn.calibration import Calibration
from bloodcnn.config import StorageConfig
from bloodcnn.openvino_runtime import RuntimeInfo

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
PRODUCTION = "production"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryError(RuntimeError):
    pass


class ModelMetadata(BaseModel):
    model_name: str
    version: str
    created_at: str
    dataset_version: str
    class_names: list[str]
    image_size: int
    preprocessing: str = Field("mobilenet_v2", description="keras.applications preprocess_input family")
    test_time_augmentation: Literal["none", "flips"] = Field(
        "none", description="flips: answers average the image and its 3 flips (train.test_time_augmentation)")
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    code_version: str = "unknown"
    model_file: str = MODEL_FILE
    model_sha256: str
    artifacts: list[str] = Field(default_factory=list)
    calibration: Calibration | None = Field(
        None, description="temperature and conformal quantile; None for versions from before them")
    runtime: RuntimeInfo | None = Field(
        None, description="the OpenVINO artifact and its precision gate; None: served by TensorFlow")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """The git commit of the code that trained a model, when it runs from a checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from bloodcnn import __version__

    return __version__


class Registry:
    def __init__(self, uri: str, model_name: str, storage_config: StorageConfig | None = None):
        self.root = storage.join(uri, model_name)
        self.model_name = model_name
        self.store = storage.store_for(self.root, storage_config)

    def _uri(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @staticmethod
    def new_version() -> str:
        """Sortable and unique: UTC time plus a random suffix."""
        return datetime.now(timezone.utc).strftime("v%Y%m%d-%H%M%S-") + secrets.token_hex(3)

    def register(
        self,
        model_path: str | Path,
        metadata: dict[str, Any],
        artifacts: dict[str, str | Path | bytes] | None = None,
        version: str | None = None,
        runtime: tuple[RuntimeInfo, Path] | None = None,
    ) -> ModelMetadata:
        """Upload the model, artifacts and the OpenVINO files (``runtime``: their info and the
        folder they were exported into), then metadata.json last."""
        version = version or self.new_version()
        if not _VERSION_RE.match(version) or version == PRODUCTION:
            raise RegistryError(f"invalid model version name: {version!r}")
        self.store.ensure_container(self.root)
        artifacts = artifacts or {}
        self.store.upload_file(model_path, self._uri(version, MODEL_FILE))
        for name, content in artifacts.items():
            target = self._uri(version, name)
            if isinstance(content, bytes):
                self.store.write_bytes(target, content)
            else:
                self.store.upload_file(content, target)
        if runtime is not None:
            self._upload_runtime(version, *runtime)
        meta = ModelMetadata(
            model_name=self.model_name,
            version=version,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            model_sha256=sha256_file(model_path),
            artifacts=sorted(artifacts),
            runtime=runtime[0] if runtime else None,
            **{k: v for k, v in metadata.items()
               if k not in {"model_name", "version", "created_at", "model_sha256", "artifacts", "runtime"}},
        )
        self.store.write_bytes(self._uri(version, METADATA_FILE), meta.model_dump_json(indent=2).encode())
        return meta

    def _upload_runtime(self, version: str, info: RuntimeInfo, folder: Path) -> None:
        for name, digest in info.files.items():
            local = Path(folder) / name
            if sha256_file(local) != digest:
                raise RegistryError(f"{local} changed after its export: sha256 differs from the gate's")
            self.store.upload_file(local, self._uri(version, name))

    def set_runtime(self, version: str, info: RuntimeInfo, folder: Path) -> ModelMetadata:
        """Add (or replace) the OpenVINO artifact of an existing version: files first, then its
        metadata.json in one PUT, so a failure leaves the version as it was."""
        meta = self.get(version)
        self._upload_runtime(version, info, folder)
        meta = meta.model_copy(update={"runtime": info})
        self.store.write_bytes(self._uri(version, METADATA_FILE), meta.model_dump_json(indent=2).encode())
        return meta

    def fetch_runtime(self, meta: ModelMetadata, local_dir: str | Path) -> Path:
        """Download a version's OpenVINO files, sha256-checked like the model; -> model.xml."""
        if meta.runtime is None:
            raise RegistryError(f"model {self.model_name}/{meta.version} has no OpenVINO artifact")
        root = Path(local_dir) / self.model_name / meta.version
        for name, digest in meta.runtime.files.items():
            local = root / name
            if not (local.exists() and sha256_file(local) == digest):
                self.store.download_file(self._uri(meta.version, name), local)
            if sha256_file(local) != digest:
                local.unlink(missing_ok=True)
                raise RegistryError(f"{name} of {self.model_name}/{meta.version} is corrupt: sha256 does not "
                                    f"match the registered {digest[:12]}...")
        return root / meta.runtime.xml

    def read_artifact(self, version: str, name: str) -> bytes:
        """One file registered next to a version's model (metrics.json, model_card.html, ...)."""
        if name not in self.get(version).artifacts:
            raise RegistryError(f"model {self.model_name}/{version} has no artifact {name!r}")
        return self.store.read_bytes(self._uri(version, name))

    def get(self, version: str) -> ModelMetadata:
        try:
            raw = self.store.read_bytes(self._uri(version, METADATA_FILE))
        except storage.ObjectNotFound:
            raise RegistryError(f"model version {version!r} not found (or incomplete) in {self.root}") from None
        return ModelMetadata.model_validate_json(raw)

    def versions(self) -> list[ModelMetadata]:
        """Complete versions, oldest first."""
        found = []
        for uri in self.store.list(self.root):
            if uri.endswith("/" + METADATA_FILE):
                found.append(ModelMetadata.model_validate_json(self.store.read_bytes(uri)))
        return sorted(found, key=lambda m: (m.created_at, m.version))

    def production(self) -> str | None:
        try:
            return json.loads(self.store.read_bytes(self._uri(PRODUCTION)))["version"]
        except storage.ObjectNotFound:
            return None

    def resolve(self, ref: str = PRODUCTION) -> str:
        """A version name for ``production``, ``latest`` or a pinned version."""
        if ref == PRODUCTION:
            version = self.production()
            if version is None:
                raise RegistryError(f"no production model in {self.root}: train one or run 'bloodcnn models promote'")
            return version
        if ref == "latest":
            versions = self.versions()
            if not versions:
                raise RegistryError(f"no model versions in {self.root}")
            return versions[-1].version
        return ref

    def promote(self, version: str) -> ModelMetadata:
        meta = self.get(version)  # refuses incomplete versions
        pointer = {"version": version, "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.store.write_bytes(self._uri(PRODUCTION), json.dumps(pointer).encode())
        return meta

    def fetch(self, ref: str, local_dir: str | Path) -> tuple[Path, ModelMetadata]:
        """Download a version's model file and check its sha256 before anyone loads it."""
        meta = self.get(self.resolve(ref))
        local = Path(local_dir) / self.model_name / meta.version / meta.model_file
        if not (local.exists() and sha256_file(local) == meta.model_sha256):
            self.store.download_file(self._uri(meta.version, meta.model_file), local)
        digest = sha256_file(local)
        if digest != meta.model_sha256:
            local.unlink(missing_ok=True)
            raise RegistryError(
                f"model file of {self.model_name}/{meta.version} is corrupt: sha256 {digest[:12]}... "
                f"does not match the registered {meta.model_sha256[:12]}..."
            )
        return local, meta
