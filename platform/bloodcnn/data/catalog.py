"""Scan a folder of class sub-folders (local or s3://), validate every image and hash it.

Why: a dataset is only trustworthy if every file was opened, checked and fingerprinted. The
sha256 finds byte-identical copies; the perceptual (average) hash finds near-duplicates that
must stay in one split.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

from bloodcnn import console, storage
from bloodcnn.config import DataConfig, StorageConfig
from bloodcnn.data import engine
from bloodcnn.data.manifest import BadImage, DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
SCAN_BATCH = 32  # files per task: small enough to spread 3,000 images over a cluster
_CONVERTIBLE_MODES = {"RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "YCbCr"}


@dataclass
class CatalogEntry:
    source: str  # path relative to the source root, e.g. "Benign/WBC-Benign-001.jpg"
    uri: str
    label: int
    sha256: str
    ahash: np.ndarray  # bool bits
    width: int
    height: int
    rgb_jpeg: bool  # the file is already what a shard holds: written as it is, not re-encoded
    # No pixels or bytes: the catalogue of a million images must fit in the driver. The shard
    # writers read each file again (``load_jpeg``) and check it still has this sha256.


@dataclass
class Catalog:
    entries: list[CatalogEntry]
    bad: list[BadImage]
    class_folders: list[str]
    class_names: list[str]
    scanned: int
    nodes: dict[str, int]  # images validated and hashed per node


def _list_class_files(source: str, folders: list[str], store) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {f: [] for f in folders}
    root = source.rstrip("/")
    for uri in store.list(root):
        rel = uri[len(root) + 1:]
        parts = rel.split("/")
        if len(parts) != 2 or parts[0] not in files or parts[1].startswith("."):
            continue
        files[parts[0]].append(uri)
    return files


def _discover_folders(source: str, store) -> list[str]:
    root = source.rstrip("/")
    found = {uri[len(root) + 1:].split("/")[0] for uri in store.list(root) if "/" in uri[len(root) + 1:]}
    return sorted(f for f in found if not f.startswith("."))


def _check_source(source: str, store) -> None:
    if storage.is_s3(source):
        if next(iter(store.list(source)), None) is None:
            raise DatasetError(f"source not found or empty: {source}")
    elif not Path(source).is_dir():
        raise DatasetError(f"source folder not found: {source}")


def _decode(data: bytes, cfg: DataConfig) -> Image.Image:
    """Decode fully and check size and mode; ``ValueError`` says what is wrong with the file."""
    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()  # structural check (truncated chunks, bad CRCs)
            img = Image.open(io.BytesIO(data))
            img.load()  # full decode: catches truncated JPEG data
    except UnidentifiedImageError:
        raise ValueError("not an image (no decoder recognises it)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ValueError(f"too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"corrupt or truncated image: {exc}") from None
    if img.mode not in _CONVERTIBLE_MODES:
        raise ValueError(f"unsupported colour mode {img.mode}")
    w, h = img.size
    if min(w, h) < cfg.min_size:
        raise ValueError(f"too small: {w}x{h} (min_size is {cfg.min_size})")
    return img


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _inspect(data: bytes, cfg: DataConfig) -> tuple[np.ndarray, int, int, bool]:
    """Validate one file; return (ahash bits, width, height, whether it is an RGB JPEG)."""
    img = _decode(data, cfg)
    bits = imagehash.average_hash(_rgb(img), hash_size=cfg.hash_size).hash.flatten()
    return bits, img.width, img.height, img.format == "JPEG" and img.mode == "RGB"


def load_jpeg(uri: str, sha256: str, rgb_jpeg: bool, cfg: DataConfig, store) -> bytes:
    """The image as RGB JPEG bytes: the file itself when it already is one, else re-encoded.

    The file is read again and must still have the catalogue's sha256: a source changed
    between scanning and writing would put pixels in a shard that the manifest does not describe.
    """
    data = store.read_bytes(uri)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DatasetError(f"source changed while preparing: {uri} (its sha256 differs from the scan's)")
    if rgb_jpeg:
        return data
    buf = io.BytesIO()
    _rgb(_decode(data, cfg)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def scan_batch(batch: engine.Batch, *, data: dict, storage_config: dict, root: str) -> engine.Batch:
    """Validate and hash a batch of files (``label``, ``uri``) on whichever node runs it."""
    cfg = DataConfig.model_validate(data)
    store = storage.store_for(root, StorageConfig.model_validate(storage_config))
    n, nbytes = len(batch["uri"]), (cfg.hash_size ** 2 + 7) // 8
    out = {"source": [], "sha256": [], "width": [], "height": [], "rgb_jpeg": [], "reason": []}
    hashes = np.zeros((n, nbytes), dtype=np.uint8)
    for i, uri in enumerate(map(str, batch["uri"])):
        rel = uri[len(root) + 1:]
        row = {"source": rel, "sha256": "", "width": 0, "height": 0, "rgb_jpeg": False, "reason": ""}
        if Path(rel).suffix.lower() not in IMAGE_SUFFIXES:
            row["reason"] = f"not an image file type ({Path(rel).suffix or 'no extension'})"
        else:
            data = store.read_bytes(uri)
            try:
                bits, row["width"], row["height"], row["rgb_jpeg"] = _inspect(data, cfg)
                row["sha256"] = hashlib.sha256(data).hexdigest()
                hashes[i] = np.packbits(bits)
            except ValueError as exc:
                row["reason"] = str(exc)
        for k, v in row.items():
            out[k].append(v)
    node = engine.node_id()
    return {**{k: np.array(v) for k, v in out.items()}, "uri": np.array(batch["uri"], dtype=str),
            "label": np.asarray(batch["label"], dtype=np.int64), "ahash": hashes,
            "node": np.array([node] * n), "images": np.ones(n, dtype=np.int64)}


def _rows(batches: list[engine.Batch], nbits: int) -> tuple[list[CatalogEntry], list[BadImage]]:
    entries, bad = [], []
    for b in batches:
        for i in range(len(b["uri"])):
            if b["reason"][i]:
                bad.append(BadImage(path=str(b["source"][i]), reason=str(b["reason"][i])))
                continue
            entries.append(CatalogEntry(
                source=str(b["source"][i]), uri=str(b["uri"][i]), label=int(b["label"][i]),
                sha256=str(b["sha256"][i]), ahash=np.unpackbits(b["ahash"][i], count=nbits).astype(bool),
                width=int(b["width"][i]), height=int(b["height"][i]), rgb_jpeg=bool(b["rgb_jpeg"][i]),
            ))
    return entries, bad


def build_catalog(cfg: DataConfig, storage_config: StorageConfig | None = None, progress: bool = True) -> Catalog:
    store = storage.store_for(cfg.source, storage_config)
    _check_source(cfg.source, store)
    folders = list(cfg.class_names) or _discover_folders(cfg.source, store)
    names = [cfg.class_names.get(f, f) for f in folders] if cfg.class_names else folders
    if len(folders) < 2:
        raise DatasetError(f"need at least 2 class folders in {cfg.source}, found {folders}")
    files = _list_class_files(cfg.source, folders, store)
    for folder, uris in files.items():
        if not uris:
            raise DatasetError(f"class folder is missing or empty: {storage.join(cfg.source, folder)}")
    extra = set(_discover_folders(cfg.source, store)) - set(folders) if cfg.class_names else set()
    if extra:
        log.warning("ignoring sub-folders not listed in data.class_names: %s", sorted(extra))

    rows = [{"label": folders.index(folder), "uri": uri} for folder in folders for uri in sorted(files[folder])]
    on_ray = engine.use_ray(cfg.engine)
    if on_ray:
        line = engine.connect()
        if progress:
            console.say(line)
    batches, nodes = engine.run_stage(
        scan_batch, rows, total=len(rows), desc="validate+hash", batch_size=SCAN_BATCH, workers=cfg.workers,
        ray=on_ray, progress=progress,
        fn_kwargs={"data": cfg.model_dump(mode="json"), "storage_config": (storage_config or StorageConfig()).model_dump(),
                   "root": cfg.source.rstrip("/")},
    )
    entries, bad = _rows(batches, cfg.hash_size ** 2)
    if bad:
        listing = "\n".join(f"  {b.path}: {b.reason}" for b in bad)
        if cfg.on_bad_image == "fail":
            raise DatasetError(
                f"{len(bad)} bad image(s) in {cfg.source} (use --on-bad-image skip to leave them out):\n{listing}"
            )
        log.warning("skipping %d bad image(s):\n%s", len(bad), listing)
    for i, folder in enumerate(folders):
        if not any(e.label == i for e in entries):
            raise DatasetError(f"class folder has no valid images: {storage.join(cfg.source, folder)}")
    return Catalog(entries, bad, folders, names, scanned=len(rows), nodes=nodes)
