"""TFRecord shards: one ``tf.train.Example`` per image with JPEG bytes, label and id."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import tensorflow as tf

from bloodcnn.registry import sha256_file

FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "id": tf.io.FixedLenFeature([], tf.string),
}


def encode_example(jpeg: bytes, label: int, image_id: str) -> bytes:
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)  # same bytes every run


def parse_example(record: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf.io.parse_single_example(record, FEATURES)


def shard_names(split: str, count: int, shard_size: int) -> list[str]:
    n = max(1, math.ceil(count / shard_size))
    return [f"{split}-{i:05d}-of-{n:05d}.tfrecord" for i in range(n)]


def write_shard(path: Path, records: Iterable[bytes]) -> tuple[str, int, int]:
    """Write records to ``path``; return (sha256, size, count)."""
    count = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for rec in records:
            writer.write(rec)
            count += 1
    return sha256_file(path), path.stat().st_size, count
