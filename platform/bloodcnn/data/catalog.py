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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

from bloodcnn import console, storage
from bloodcnn.config import DataConfig, StorageConfig
from bloodcnn.data.manifest import BadImage, DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
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
    # No pixels or bytes: the catalogue of a million images must fit in the driver. The shard
    # writers read each file again (``load_jpeg``) and check it still has this sha256.


@dataclass
class Catalog:
    entries: list[CatalogEntry]
    bad: list[BadImage]
    class_folders: list[str]
    class_names: list[str]
    scanned: int


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


def _inspect(data: bytes, cfg: DataConfig) -> tuple[np.ndarray, int, int]:
    """Validate one file; return (ahash bits, width, height)."""
    img = _decode(data, cfg)
    bits = imagehash.average_hash(_rgb(img), hash_size=cfg.hash_size).hash.flatten()
    return bits, img.width, img.height


def load_jpeg(entry: CatalogEntry, cfg: DataConfig, store) -> bytes:
    """The entry's image as RGB JPEG bytes: the file itself when it already is one, else re-encoded.

    The file is read again and must still have the catalogue's sha256: a source changed
    between scanning and writing would put pixels in a shard that the manifest does not describe.
    """
    data = store.read_bytes(entry.uri)
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise DatasetError(f"source changed while preparing: {entry.uri} (its sha256 differs from the scan's)")
    img = _decode(data, cfg)
    if img.format == "JPEG" and img.mode == "RGB":
        return data
    buf = io.BytesIO()
    _rgb(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


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

    jobs = [(folders.index(folder), uri) for folder in folders for uri in sorted(files[folder])]
    root = cfg.source.rstrip("/")

    def work(job: tuple[int, str]) -> CatalogEntry | BadImage:
        label, uri = job
        rel = uri[len(root) + 1:]
        if Path(rel).suffix.lower() not in IMAGE_SUFFIXES:
            return BadImage(path=rel, reason=f"not an image file type ({Path(rel).suffix or 'no extension'})")
        data = store.read_bytes(uri)
        try:
            bits, w, h = _inspect(data, cfg)
        except ValueError as exc:
            return BadImage(path=rel, reason=str(exc))
        return CatalogEntry(rel, uri, label, hashlib.sha256(data).hexdigest(), bits, w, h)

    entries: list[CatalogEntry] = []
    bad: list[BadImage] = []
    with ThreadPoolExecutor(cfg.workers) as pool:
        results = pool.map(work, jobs)
        for res in console.bar(results, total=len(jobs), desc="validate+hash", unit="img", disable=not progress):
            (bad if isinstance(res, BadImage) else entries).append(res)
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
    return Catalog(entries, bad, folders, names, scanned=len(jobs))
