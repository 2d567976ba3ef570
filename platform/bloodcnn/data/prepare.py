"""``bloodcnn data prepare``: class folders -> checksummed TFRecord shards + manifest.json.

Crash safety: shards go under ``<output>/<dataset_version>/`` and ``manifest.json`` is written
last, so an interrupted run leaves at most orphan shards that no manifest points to. A re-run
with the same inputs finds the manifest with the same version and does nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bloodcnn import storage
from bloodcnn.config import AppConfig
from bloodcnn.data import engine
from bloodcnn.data.augment import augment_jpeg
from bloodcnn.data.catalog import Catalog, build_catalog, load_jpeg
from bloodcnn.data.manifest import MANIFEST_FILE, SPLITS, ImageEntry, Manifest, ShardInfo, SplitInfo
from bloodcnn.data.shards import encode_example, shard_names, write_shard
from bloodcnn.data.split import SplitResult, split_catalog

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def dataset_version(catalog: Catalog, result: SplitResult, app: AppConfig) -> str:
    """A content id: the images, their labels and splits, and every setting that shapes the shards."""
    cfg = app.data
    h = hashlib.sha256()
    settings = {
        "format": FORMAT_VERSION,
        "classes": catalog.class_names,
        "augment": cfg.augment.model_dump(),
        "shard_size": cfg.shard_size,
        "seed": cfg.split.seed,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for entry, split in sorted(zip(result.unique, result.splits), key=lambda p: p[0].sha256):
        h.update(f"{entry.sha256}:{entry.label}:{split}\n".encode())
    return "ds-" + h.hexdigest()[:16]


def _existing(output: str, version: str, store) -> Manifest | None:
    uri = storage.join(output, MANIFEST_FILE)
    if not store.exists(uri):
        return None
    try:
        manifest = Manifest.model_validate_json(store.read_bytes(uri))
    except ValueError:
        return None
    if manifest.dataset_version != version:
        return None
    for split in manifest.splits.values():
        for shard in split.shards:
            target = storage.join(output, shard.path)
            if not store.exists(target) or store.size(target) != shard.size:
                return None
    return manifest


def shard_plan(result: SplitResult, app: AppConfig) -> dict[str, list[tuple[str, list[tuple[int, int]]]]]:
    """Per split, each shard's name and its images as ``(unique index, copy)``; copy 0 is the original.

    Only indices, so the driver holds no image bytes. Each split is shuffled (seeded) so classes
    and copies mix across shards and each training worker sees every class.
    """
    cfg = app.data
    items: dict[str, list[tuple[int, int]]] = {s: [] for s in SPLITS}
    for i, split in enumerate(result.splits):
        items[split].append((i, 0))
    train = [i for i, s in enumerate(result.splits) if s == "train"]
    items["train"] += [(i, k) for i in train for k in range(1, cfg.augment.copies + 1)]
    rng = np.random.default_rng(cfg.split.seed)
    plan = {}
    for split in SPLITS:
        order = rng.permutation(len(items[split]))
        mixed = [items[split][i] for i in order]
        names = shard_names(split, len(mixed), cfg.shard_size)
        plan[split] = [(name, mixed[j * cfg.shard_size:(j + 1) * cfg.shard_size]) for j, name in enumerate(names)]
    return plan


def _shard_rows(result: SplitResult, app: AppConfig) -> list[dict]:
    """One row per shard: what a writer on any node needs to make it, without the catalogue."""
    rows = []
    for split, shards in shard_plan(result, app).items():
        for name, items in shards:
            images = [(result.unique[i].uri, result.unique[i].sha256, result.unique[i].label,
                       result.unique[i].rgb_jpeg, k) for i, k in items]
            rows.append({"split": split, "name": name, "items": json.dumps(images), "images": len(items)})
    return rows


def _write_shard(name: str, images: list, app: AppConfig, version: str, source, store, tmp: Path) -> ShardInfo:
    """Read, augment and encode one shard's images, write it and upload it: one shard in memory."""
    cfg = app.data
    records = []
    for uri, sha256, label, rgb_jpeg, k in images:
        jpeg = load_jpeg(uri, sha256, rgb_jpeg, cfg, source)
        if k == 0:
            records.append(encode_example(jpeg, label, sha256))
        else:
            jpeg = augment_jpeg(jpeg, sha256, k, cfg.split.seed, cfg.augment)
            records.append(encode_example(jpeg, label, f"{sha256}-aug{k}"))
    local = tmp / name
    sha, size, count = write_shard(local, records)
    rel = f"{version}/shards/{name}"
    store.upload_file(local, storage.join(cfg.output, rel))
    local.unlink()
    return ShardInfo(path=rel, sha256=sha, size=size, count=count)


def shard_batch(batch: engine.Batch, *, app: dict, version: str) -> engine.Batch:
    """Write the batch's shards (one per task on Ray) on whichever node runs it."""
    config = AppConfig.model_validate(app)
    source = storage.store_for(config.data.source, config.storage)
    store = storage.store_for(config.data.output, config.storage)
    infos = []
    with tempfile.TemporaryDirectory(prefix="bloodcnn-shards-") as tmp:
        for name, items in zip(batch["name"], batch["items"]):
            infos.append(_write_shard(str(name), json.loads(str(items)), config, version, source, store, Path(tmp)))
    n = len(infos)
    return {"split": np.array(batch["split"], dtype=str), "path": np.array([i.path for i in infos]),
            "sha256": np.array([i.sha256 for i in infos]), "size": np.array([i.size for i in infos], dtype=np.int64),
            "count": np.array([i.count for i in infos], dtype=np.int64),
            "node": np.array([engine.node_id()] * n), "images": np.asarray(batch["images"], dtype=np.int64)}


def write_shards(
    catalog: Catalog, result: SplitResult, app: AppConfig, version: str, progress: bool
) -> tuple[dict[str, SplitInfo], dict[str, int]]:
    """Every shard, in parallel on the data engine, each uploaded as it is done.

    The first failure cancels the shards not started yet; no manifest points to what was written.
    Returns the splits and the images written per node.
    """
    cfg = app.data
    rows = _shard_rows(result, app)
    batches, nodes = engine.run_stage(
        shard_batch, rows, total=sum(r["images"] for r in rows), desc="write shards", batch_size=1,
        workers=cfg.workers, ray=engine.use_ray(cfg.engine), progress=progress,
        fn_kwargs={"app": app.model_dump(mode="json"), "version": version},
    )
    shards: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
    for b in batches:
        for i in range(len(b["path"])):
            shards[str(b["split"][i])].append(ShardInfo(path=str(b["path"][i]), sha256=str(b["sha256"][i]),
                                                        size=int(b["size"][i]), count=int(b["count"][i])))
    splits = {}
    for split in SPLITS:
        counts = {name: 0 for name in catalog.class_names}
        for entry, s in zip(result.unique, result.splits):
            if s == split:
                counts[catalog.class_names[entry.label]] += 1
        total = sum(shard.count for shard in shards[split])
        splits[split] = SplitInfo(counts=counts, augmented=total - sum(counts.values()), total=total,
                                  shards=shards[split])
    return splits, nodes


def class_balance_png(counts: dict[str, dict[str, int]], augmented: int, class_names: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.26
    x = np.arange(len(class_names))
    for i, split in enumerate(SPLITS):
        values = [counts[split].get(c, 0) for c in class_names]
        bars = ax.bar(x + (i - 1) * width, values, width, label=split)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, class_names)
    ax.set_ylabel("unique images")
    ax.set_title(f"Class balance per split (train also has {augmented} augmented copies)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def summary_table(manifest: Manifest) -> str:
    names = manifest.class_names
    width = max(12, *(len(n) for n in names))
    lines = [f"{'class':<{width}} " + " ".join(f"{s:>7}" for s in SPLITS) + f" {'total':>7}"]
    for name in names:
        row = [manifest.splits[s].counts.get(name, 0) for s in SPLITS]
        lines.append(f"{name:<{width}} " + " ".join(f"{v:>7}" for v in row) + f" {sum(row):>7}")
    totals = [sum(manifest.splits[s].counts.values()) for s in SPLITS]
    lines.append(f"{'unique':<{width}} " + " ".join(f"{v:>7}" for v in totals) + f" {sum(totals):>7}")
    lines.append(f"{'+ augmented':<{width}} {manifest.splits['train'].augmented:>7}")
    lines.append(
        f"scanned {manifest.scanned}, bad {len(manifest.bad_images)}, exact duplicates removed "
        f"{len(manifest.exact_duplicates)}, near-duplicate groups {manifest.near_duplicate_groups}"
    )
    for stage, per_node in manifest.nodes.items():
        lines.append(f"{stage}: {len(per_node)} node(s), " + " + ".join(str(n) for n in per_node.values()) + " images")
    return "\n".join(lines)


def prepare_dataset(app: AppConfig, progress: bool = True) -> Manifest:
    cfg = app.data
    catalog = build_catalog(cfg, app.storage, progress=progress)
    result = split_catalog(catalog.entries, cfg.near_duplicate_distance, cfg.split)
    version = dataset_version(catalog, result, app)
    store = storage.store_for(cfg.output, app.storage)
    store.ensure_container(cfg.output)
    existing = _existing(cfg.output, version, store)
    if existing is not None:
        log.info("dataset %s is already prepared at %s: nothing to do", version, cfg.output)
        return existing

    splits, shard_nodes = write_shards(catalog, result, app, version, progress)

    group_sizes = np.bincount(result.groups) if len(result.groups) else np.zeros(0)
    plot_rel = f"{version}/class_balance.png"
    store.write_bytes(
        storage.join(cfg.output, plot_rel),
        class_balance_png({s: splits[s].counts for s in SPLITS}, splits["train"].augmented, catalog.class_names),
    )
    manifest = Manifest(
        dataset_version=version,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=cfg.source,
        class_names=catalog.class_names,
        class_folders=catalog.class_folders,
        seed=cfg.split.seed,
        splits=splits,
        config=cfg.model_dump(),
        scanned=catalog.scanned,
        bad_images=catalog.bad,
        exact_duplicates=result.duplicates,
        near_duplicate_groups=int((group_sizes > 1).sum()),
        images=[
            ImageEntry(id=e.sha256, source=e.source, label=e.label, split=s, group=int(g))
            for e, s, g in zip(result.unique, result.splits, result.groups)
        ],
        plots=[plot_rel],
        nodes={"validate+hash": catalog.nodes, "write shards": shard_nodes},
    )
    store.write_bytes(storage.join(cfg.output, MANIFEST_FILE), manifest.model_dump_json(indent=1).encode())
    return manifest
