"""Read a prepared split as a ``tf.data`` pipeline, from local disk or S3.

Every shard's sha256 is checked against the manifest before a single record is used, so a
corrupted or tampered shard fails loudly instead of silently training on garbage. S3 shards
are fetched concurrently into a local cache (keyed by dataset version) and read from there;
worker ``i`` of ``N`` gets shards ``i, i+N, ...`` so data-parallel workers never overlap.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tensorflow as tf
from pydantic import ValidationError

from bloodcnn import storage
from bloodcnn.config import StorageConfig
from bloodcnn.data.manifest import MANIFEST_FILE, DatasetError, Manifest, ShardChecksumError, ShardInfo
from bloodcnn.data.shards import parse_example
from bloodcnn.preprocess import decode_jpeg
from bloodcnn.registry import sha256_file


def _manifest_uri(dataset_uri: str) -> str:
    return dataset_uri if dataset_uri.endswith(".json") else storage.join(dataset_uri, MANIFEST_FILE)


def _root(dataset_uri: str) -> str:
    return dataset_uri.rsplit("/", 1)[0] if dataset_uri.endswith(".json") else dataset_uri.rstrip("/")


def load_manifest(dataset_uri: str, storage_config: StorageConfig | None = None) -> Manifest:
    uri = _manifest_uri(dataset_uri)
    try:
        raw = storage.read_bytes(uri, storage_config)
    except storage.ObjectNotFound:
        raise DatasetError(f"no {MANIFEST_FILE} at {uri}: run 'bloodcnn data prepare' first") from None
    try:
        return Manifest.model_validate_json(raw)
    except (ValidationError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"corrupt {MANIFEST_FILE} at {uri}: {str(exc).splitlines()[0]}") from None


def worker_shards(manifest: Manifest, split: str, worker_index: int, num_workers: int) -> list[ShardInfo]:
    if split not in manifest.splits:
        raise DatasetError(f"split {split!r} not in dataset (has {sorted(manifest.splits)})")
    shards = manifest.splits[split].shards
    if num_workers > len(shards):
        raise DatasetError(
            f"split {split!r} has {len(shards)} shard(s), fewer than {num_workers} workers: "
            "prepare with a smaller data.shard_size"
        )
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} out of range for {num_workers} workers")
    return shards[worker_index::num_workers]


def examples_per_worker(manifest: Manifest, split: str, num_workers: int) -> list[int]:
    return [sum(s.count for s in worker_shards(manifest, split, i, num_workers)) for i in range(num_workers)]


def _verify(path: Path, shard: ShardInfo, origin: str) -> None:
    digest = sha256_file(path)
    if digest != shard.sha256:
        raise ShardChecksumError(
            f"shard {origin} is corrupt: sha256 {digest[:16]}... does not match the manifest's {shard.sha256[:16]}..."
        )


def fetch_shards(
    dataset_uri: str,
    shards: list[ShardInfo],
    manifest: Manifest,
    cache_dir: str | Path | None = None,
    storage_config: StorageConfig | None = None,
    max_concurrency: int = 8,
) -> list[str]:
    """Local, checksum-verified paths for the shards (S3 shards are cached on disk)."""
    root = _root(dataset_uri)
    if not storage.is_s3(root):
        paths = []
        for shard in shards:
            path = Path(storage.join(root, shard.path))
            if not path.is_file():
                raise DatasetError(f"shard missing: {path}")
            _verify(path, shard, str(path))
            paths.append(str(path))
        return paths
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "bloodcnn-cache") / manifest.dataset_version
    store = storage.store_for(root, storage_config)

    def fetch(shard: ShardInfo) -> str:
        uri = storage.join(root, shard.path)
        local = cache / Path(shard.path).name
        if local.exists() and local.stat().st_size == shard.size:
            try:
                _verify(local, shard, uri)
                return str(local)
            except ShardChecksumError:
                local.unlink()
        try:
            store.download_file(uri, local)
        except storage.ObjectNotFound:
            raise DatasetError(f"shard missing: {uri}") from None
        try:
            _verify(local, shard, uri)
        except ShardChecksumError:
            local.unlink(missing_ok=True)
            raise
        return str(local)

    with ThreadPoolExecutor(min(max_concurrency, max(1, len(shards)))) as pool:
        return list(pool.map(fetch, shards))


def rotate_and_flip(image: tf.Tensor) -> tf.Tensor:
    """One of the 8 rotations/flips of a square image, at random: a smear has no up or left."""
    image = tf.image.rot90(image, tf.random.uniform([], 0, 4, dtype=tf.int32))
    return tf.image.random_flip_left_right(image)


def _augment(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Light on-the-fly augmentation (the heavy, paper-style copies are made offline)."""
    image = rotate_and_flip(image)
    image = tf.image.random_brightness(image, 0.1 * 255.0)
    scale = tf.random.uniform([], 0.85, 1.0)
    crop = tf.cast(scale * image_size, tf.int32)
    image = tf.image.random_crop(image, tf.stack([crop, crop, 3]))
    image = tf.image.resize(image, (image_size, image_size))
    return tf.clip_by_value(image, 0.0, 255.0)


#: records in the shuffle buffer (with the in-memory cache, decoded images; otherwise JPEG bytes)
SHUFFLE_BUFFER = 2048


def fits_in_memory(manifest: Manifest, split: str, image_size: int, worker_index: int, num_workers: int,
                   memory_cache_mb: float, shuffle: bool = False) -> bool:
    """Whether a worker's decoded images of ``split`` (uint8, image_size² × 3 bytes each), and as many
    again in the shuffle buffer when ``shuffle``, fit in ``memory_cache_mb`` MiB (0: never)."""
    count = sum(s.count for s in worker_shards(manifest, split, worker_index, num_workers))
    held = count + (min(count, SHUFFLE_BUFFER) if shuffle else 0)
    return memory_cache_mb > 0 and held * image_size * image_size * 3 <= memory_cache_mb * 2**20


def make_dataset(
    dataset_uri: str,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    worker_index: int = 0,
    num_workers: int = 1,
    shuffle: bool = False,
    augment: bool = False,
    repeat: bool = False,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    storage_config: StorageConfig | None = None,
    manifest: Manifest | None = None,
    with_ids: bool = False,
    class_weights: Sequence[float] | None = None,
    memory_cache_mb: float = 0,
) -> tf.data.Dataset:
    """(images float32 0..255 [B, S, S, 3], one-hot labels [B, C]) batches; ids too if ``with_ids``,
    per-example weights (``class_weights[label]``) too if ``class_weights``.

    With ``memory_cache_mb``, a worker's split whose decoded images fit in that many MiB (see
    :func:`fits_in_memory`) is decoded once, kept in memory as uint8 and reshuffled from there every
    epoch (JPEG decoding is ~60% of the input pipeline's CPU on 224 px images); larger splits
    stream from the shards every epoch.
    """
    manifest = manifest or load_manifest(dataset_uri, storage_config)
    shards = worker_shards(manifest, split, worker_index, num_workers)
    files = fetch_shards(dataset_uri, shards, manifest, cache_dir, storage_config)
    num_classes = manifest.num_classes
    autotune = tf.data.AUTOTUNE
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(f"{len(class_weights)} class weights for {num_classes} classes")
    weights = None if class_weights is None else tf.constant(list(class_weights), tf.float32)
    in_memory = fits_in_memory(manifest, split, image_size, worker_index, num_workers, memory_cache_mb, shuffle)

    def decode(record):
        ex = parse_example(record)
        image = decode_jpeg(ex["image"], image_size)
        if in_memory:  # exact when the shards hold image_size pixels (the resize is then the identity)
            image = tf.cast(tf.round(image), tf.uint8)
        return image, ex["label"], ex["id"]

    def finish(image, label, id_):
        image = tf.cast(image, tf.float32)
        if augment:
            image = _augment(image, image_size)
        onehot = tf.one_hot(label, num_classes, dtype=tf.float32)
        if with_ids:
            return image, onehot, id_
        if weights is not None:
            return image, onehot, tf.gather(weights, label)
        return image, onehot

    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle and not in_memory:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)), num_parallel_calls=autotune,
                       deterministic=in_memory or not shuffle)
    if in_memory:
        ds = ds.map(decode, num_parallel_calls=autotune).cache()
    if shuffle:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.map(finish if in_memory else lambda record: finish(*decode(record)), num_parallel_calls=autotune,
                deterministic=not shuffle)
    ds = ds.batch(batch_size, drop_remainder=repeat).prefetch(autotune)
    options = tf.data.Options()
    # shards are already split per worker; stop tf.distribute from sharding again
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)
