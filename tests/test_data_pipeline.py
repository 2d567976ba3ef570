"""The data pipeline against a real SeaweedFS S3: catalogue, leak-free split, shards, reader."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from bloodcnn import storage
from bloodcnn.data import reader
from bloodcnn.data.manifest import DatasetError, Manifest, ShardChecksumError
from bloodcnn.data.prepare import prepare_dataset
from bloodcnn.data.split import grouped_stratified_split, near_duplicate_pairs
from bloodcnn.data.synthetic import make_class_folders

from conftest import DATASET, REPO, synthetic_config


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bloodcnn.cli", *args], capture_output=True, text=True, env=full_env, cwd=REPO,
        timeout=300,
    )


def load(uri: str) -> Manifest:
    return reader.load_manifest(uri)


def assert_no_group_spans_splits(manifest: Manifest) -> None:
    split_of_group: dict[int, set[str]] = {}
    for img in manifest.images:
        split_of_group.setdefault(img.group, set()).add(img.split)
    spanning = {g: s for g, s in split_of_group.items() if len(s) > 1}
    assert not spanning, f"groups spanning splits: {spanning}"


def test_synthetic_prepare_collapses_duplicates_and_keeps_groups_whole(synthetic_dataset):
    m = load(synthetic_dataset)
    assert m.scanned == 4 * (48 + 2 + 2)
    assert len(m.exact_duplicates) == 8 and m.unique_images == 4 * 50
    assert all(d.removed.replace("-copy", "") == d.kept.replace("-copy", "") for d in m.exact_duplicates)
    # each "-near" file must share a group with its original
    by_source = {i.source: i for i in m.images}
    for img in m.images:
        if img.source.endswith("-near.jpg"):
            original = by_source[img.source.replace("-near", "")]
            assert original.group == img.group and original.split == img.split
    assert m.near_duplicate_groups >= 8
    assert_no_group_spans_splits(m)
    # stratified: every split holds every class, close to 70/15/15
    for name in m.class_names:
        counts = {s: m.splits[s].counts[name] for s in ("train", "val", "test")}
        assert all(v > 0 for v in counts.values()), counts
        assert abs(counts["train"] / sum(counts.values()) - 0.70) < 0.06, counts
    assert m.splits["train"].augmented == sum(m.splits["train"].counts.values())  # copies=1
    for split in m.splits.values():
        assert sum(s.count for s in split.shards) == split.total
        for shard in split.shards:
            assert storage.store_for(synthetic_dataset).size(storage.join(synthetic_dataset, shard.path)) == shard.size


def test_prepare_is_deterministic_and_idempotent(synthetic_source, synthetic_dataset):
    first = load(synthetic_dataset)
    again = prepare_dataset(synthetic_config(synthetic_source, synthetic_dataset), progress=False)
    assert again.dataset_version == first.dataset_version
    assert again.created_at == first.created_at  # untouched: nothing was rewritten
    reseeded = synthetic_config(synthetic_source, "unused")
    reseeded.data.split.seed = 7
    from bloodcnn.data.catalog import build_catalog
    from bloodcnn.data.prepare import dataset_version
    from bloodcnn.data.split import split_catalog

    cat = build_catalog(reseeded.data, progress=False)
    assert dataset_version(cat, split_catalog(cat.entries, 12, reseeded.data.split), reseeded) != first.dataset_version


def test_reader_gives_disjoint_worker_shards_and_all_records(synthetic_dataset, tmp_path):
    m = load(synthetic_dataset)
    seen = []
    for worker in range(2):
        ds = reader.make_dataset(synthetic_dataset, "train", batch_size=8, image_size=32, worker_index=worker,
                                 num_workers=2, cache_dir=tmp_path, with_ids=True)
        ids = [i.decode() for _, _, batch in ds for i in batch.numpy()]
        seen.append(set(ids))
        images, labels, _ = next(iter(ds))
        assert images.shape[1:] == (32, 32, 3) and labels.shape[1] == 4
        assert float(images.numpy().max()) <= 255.0 and float(images.numpy().min()) >= 0.0
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == m.splits["train"].total
    assert reader.examples_per_worker(m, "train", 2) == [len(seen[0]), len(seen[1])]
    augmented = reader.make_dataset(synthetic_dataset, "train", batch_size=8, image_size=32, augment=True,
                                    shuffle=True, repeat=True, cache_dir=tmp_path)
    assert next(iter(augmented))[0].shape == (8, 32, 32, 3)


def test_in_memory_cache_gives_the_streamed_images_and_every_image_once_per_epoch(synthetic_dataset, tmp_path):
    """A split that fits ``memory_cache_mb`` is decoded once and kept as uint8: the same pixels as the
    streamed split at the shards' own 64 px (within rounding after a resize), and with shuffle and
    repeat each epoch still holds every image once, in a new order; a split over the budget streams."""
    m = load(synthetic_dataset)
    n = m.splits["train"].total
    per_image_mb = 64 * 64 * 3 / 2**20
    assert reader.fits_in_memory(m, "train", 64, 0, 1, n * per_image_mb)
    assert not reader.fits_in_memory(m, "train", 64, 0, 1, n * per_image_mb, shuffle=True)  # + the buffer
    assert not reader.fits_in_memory(m, "train", 64, 0, 1, n * per_image_mb - 0.01)
    assert not reader.fits_in_memory(m, "train", 64, 0, 1, 0)

    def batches(size, **kw):
        ds = reader.make_dataset(synthetic_dataset, "train", batch_size=8, image_size=size, cache_dir=tmp_path,
                                 with_ids=True, **kw)
        return {i.decode(): x for images, _, ids in ds for i, x in zip(ids.numpy(), images.numpy())}

    for size, tolerance in ((64, 0.0), (32, 0.5)):
        streamed, cached = batches(size), batches(size, memory_cache_mb=64)
        assert streamed.keys() == cached.keys() and len(cached) == n
        assert max(float(np.abs(streamed[k] - cached[k]).max()) for k in cached) <= tolerance, size
    epochs = reader.make_dataset(synthetic_dataset, "train", batch_size=n, image_size=64, cache_dir=tmp_path,
                                 with_ids=True, shuffle=True, repeat=True, augment=True, memory_cache_mb=64)
    orders = [[i.decode() for i in ids.numpy()] for _, (_, _, ids) in zip(range(3), epochs)]
    assert all(sorted(order) == sorted(streamed) for order in orders)
    assert orders[0] != orders[1] != orders[2]


def test_balanced_class_weights_reach_the_train_batches(synthetic_dataset, tmp_path):
    """Every class weighs the same in the loss: weight x count is equal per class, mean weight 1."""
    m = load(synthetic_dataset)
    weights = m.balanced_class_weights()
    counts = [m.splits["train"].counts[name] for name in m.class_names]
    assert [w * n for w, n in zip(weights, counts)] == pytest.approx([sum(counts) / len(counts)] * len(counts))
    assert sum(w * n for w, n in zip(weights, counts)) / sum(counts) == pytest.approx(1.0)
    ds = reader.make_dataset(synthetic_dataset, "train", batch_size=8, image_size=32, cache_dir=tmp_path,
                             class_weights=weights)
    for images, labels, w in ds:
        assert w.numpy() == pytest.approx(np.asarray(weights)[labels.numpy().argmax(1)])
    with pytest.raises(ValueError, match="3 class weights for 4 classes"):
        reader.make_dataset(synthetic_dataset, "train", batch_size=8, image_size=32, cache_dir=tmp_path,
                            class_weights=[1.0, 1.0, 1.0])
    empty = m.model_copy(deep=True)
    empty.splits["train"].counts["Pro-B" if "Pro-B" in m.class_names else m.class_names[-1]] = 0
    with pytest.raises(DatasetError, match="has no images of"):
        empty.balanced_class_weights()


def test_online_augmentation_uses_all_rotations_and_flips():
    """A smear has no up: the 8 rotations/flips of an asymmetric image all turn up."""
    import tensorflow as tf

    image = tf.reshape(tf.range(4 * 4 * 3, dtype=tf.float32), (4, 4, 3))
    tf.random.set_seed(0)
    seen = set()
    for _ in range(200):
        out = reader.rotate_and_flip(image).numpy()
        assert sorted(out.ravel()) == sorted(image.numpy().ravel())
        seen.add(out.tobytes())
    assert len(seen) == 8


def test_corrupted_shard_is_detected(synthetic_dataset, s3_prefix, tmp_path):
    m = load(synthetic_dataset)
    store = storage.store_for(s3_prefix)
    # copy the dataset, then flip one byte in one val shard
    for split in m.splits.values():
        for shard in split.shards:
            data = store.read_bytes(storage.join(synthetic_dataset, shard.path))
            store.write_bytes(storage.join(s3_prefix, shard.path), data)
    store.write_bytes(storage.join(s3_prefix, "manifest.json"), m.model_dump_json().encode())
    bad = m.splits["val"].shards[0]
    data = bytearray(store.read_bytes(storage.join(s3_prefix, bad.path)))
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(storage.join(s3_prefix, bad.path), bytes(data))
    with pytest.raises(ShardChecksumError, match=Path(bad.path).name):
        reader.make_dataset(s3_prefix, "val", batch_size=4, image_size=32, cache_dir=tmp_path)
    # the intact split still reads
    reader.make_dataset(s3_prefix, "test", batch_size=4, image_size=32, cache_dir=tmp_path)


def test_missing_or_corrupt_manifest(s3_prefix):
    with pytest.raises(DatasetError, match="no manifest.json"):
        reader.load_manifest(s3_prefix)
    storage.write_bytes(storage.join(s3_prefix, "manifest.json"), b"{not json")
    with pytest.raises(DatasetError, match="corrupt manifest.json"):
        reader.load_manifest(s3_prefix)


def test_interrupted_run_leaves_no_manifest_then_completes(synthetic_source, s3_prefix, monkeypatch):
    cfg = synthetic_config(synthetic_source, s3_prefix)
    calls = {"n": 0}
    real_upload = storage.S3Store.upload_file

    def flaky(self, local, uri):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_upload(self, local, uri)

    monkeypatch.setattr(storage.S3Store, "upload_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, progress=False)
    assert not storage.exists(storage.join(s3_prefix, "manifest.json"))
    monkeypatch.setattr(storage.S3Store, "upload_file", real_upload)
    m = prepare_dataset(cfg, progress=False)
    assert storage.exists(storage.join(s3_prefix, "manifest.json"))
    reader.make_dataset(s3_prefix, "test", batch_size=4, image_size=32)
    assert m.unique_images == 200


def test_a_source_changed_after_the_scan_fails_and_writes_no_manifest(tmp_path, s3_prefix, monkeypatch):
    """Shard writers read each file again: one that changed since the scan is refused, not shipped."""
    from bloodcnn.data import prepare as prepare_module

    src = make_class_folders(tmp_path / "src", per_class=8, size=48)
    cfg = synthetic_config(src, s3_prefix)
    real_split = prepare_module.split_catalog

    def split_then_edit(entries, *args):
        result = real_split(entries, *args)
        victim = src / result.unique[0].source
        Image.open(victim).rotate(90).save(victim, quality=90)
        return result

    monkeypatch.setattr(prepare_module, "split_catalog", split_then_edit)
    with pytest.raises(DatasetError, match="source changed while preparing: .*sha256 differs"):
        prepare_dataset(cfg, progress=False)
    assert not storage.exists(storage.join(s3_prefix, "manifest.json"))


def test_cli_prepares_from_s3_source_with_bad_images_skipped(tmp_path, s3_prefix):
    src = make_class_folders(tmp_path / "src", per_class=6, size=48, classes=("A", "B"))
    (src / "A" / "notes.jpg").write_text("this is not a picture")
    good = (src / "B" / "B-0000.jpg").read_bytes()
    (src / "B" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (8, 8)).save(src / "A" / "tiny.png")
    Image.new("L", (48, 48), 128).save(src / "A" / "grey.png")  # convertible: accepted
    store = storage.store_for(s3_prefix)
    for f in src.rglob("*"):
        if f.is_file():
            store.upload_file(f, storage.join(s3_prefix, "src", str(f.relative_to(src))))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  class_names: {}\n  shard_size: 4\n")
    out = storage.join(s3_prefix, "out")
    failed = run_cli("data", "prepare", "--config", str(cfg), "--source", storage.join(s3_prefix, "src"),
                     "--output", out, "--no-progress")
    assert failed.returncode == 2
    for name in ("notes.jpg", "truncated.jpg", "tiny.png"):
        assert name in failed.stderr
    assert "corrupt or truncated" in failed.stderr and "too small" in failed.stderr
    assert not storage.exists(storage.join(out, "manifest.json"))

    ok = run_cli("data", "prepare", "--config", str(cfg), "--source", storage.join(s3_prefix, "src"),
                 "--output", out, "--on-bad-image", "skip", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert "bad 3" in ok.stdout and "skipping 3 bad image(s)" in ok.stderr
    m = load(out)
    assert {b.path for b in m.bad_images} == {"A/notes.jpg", "B/truncated.jpg", "A/tiny.png"}
    assert m.unique_images == 13 and m.class_names == ["A", "B"]


@pytest.mark.parametrize(
    "case",
    ["missing-source", "empty-class", "bad-field", "unreachable", "wrong-credentials"],
)
def test_bad_input_exits_nonzero_with_a_clear_message(case, tmp_path, s3_server, s3_prefix):
    src = make_class_folders(tmp_path / "src", per_class=4, size=48)
    args = ["data", "prepare", "--source", str(src), "--output", storage.join(s3_prefix, "out"), "--no-progress"]
    env: dict[str, str] = {}
    expect = ""
    if case == "missing-source":
        args[3] = str(tmp_path / "nope")
        expect = "source folder not found"
    elif case == "empty-class":
        for f in (src / "Pre").iterdir():
            f.unlink()
        expect = "class folder is missing or empty"
    elif case == "bad-field":
        env = {"BLOODCNN__DATA__SHARD_SIZE": "zero"}
        expect = "data.shard_size"
    elif case == "unreachable":
        env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "BLOODCNN__STORAGE__MAX_ATTEMPTS": "1"}
        expect = "cannot reach the S3 endpoint"
    elif case == "wrong-credentials":
        env = {"AWS_SECRET_ACCESS_KEY": "definitely-wrong-secret-123"}
        expect = "S3 rejected the credentials"
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert expect in result.stderr
    assert "Traceback" not in result.stderr
    output = result.stdout + result.stderr
    assert s3_server.secret_key not in output and "definitely-wrong-secret-123" not in output
    assert not storage.exists(storage.join(s3_prefix, "out", "manifest.json"))


def test_real_dataset_on_s3_has_3216_unique_images_and_no_leaks(s3_server, tmp_path):
    """The ALL dataset (../shared): 40 exact pairs collapse; no near-duplicate pair crosses splits."""
    if not DATASET.is_dir():
        pytest.fail(f"dataset missing at {DATASET}")
    out = "s3://test/all-leukemia"
    from bloodcnn.config import load_config

    cfg = load_config(environ={}, overrides={"data": {"source": str(DATASET), "output": out, "augment": {"copies": 1}}})
    m = prepare_dataset(cfg, progress=False)
    assert m.scanned == 3256 and m.unique_images == 3216 and len(m.exact_duplicates) == 40
    assert_no_group_spans_splits(m)
    # independent check: recompute the hashes of every file and test every near pair
    split_of = {i.source: i.split for i in m.images}
    for dup in m.exact_duplicates:
        split_of[dup.removed] = split_of[dup.kept]
    sources = sorted(split_of)
    bits = np.stack([imagehash.average_hash(Image.open(DATASET / s), hash_size=16).hash.flatten() for s in sources])
    b = bits.astype(np.int32)
    dist = b.sum(1)[:, None] + b.sum(1)[None, :] - 2 * (b @ b.T)
    pairs = [(i, j) for i, j in zip(*np.nonzero(np.triu(dist <= 12, k=1)))]
    assert len(pairs) >= 80  # SOURCE.md reports 84 near pairs (40 exact) with its own aHash resize
    crossing = [(sources[i], sources[j]) for i, j in pairs if split_of[sources[i]] != split_of[sources[j]]]
    assert not crossing, crossing[:5]
    # the band index gives exactly the groups of the dense n x n matrix it replaced, hence the same split
    images = sorted(m.images, key=lambda i: i.source)
    keep = [sources.index(i.source) for i in images]
    near = np.triu(dist[np.ix_(keep, keep)] <= 12, k=1)
    _, dense_groups = connected_components(coo_matrix(near), directed=False)
    assert [i.group for i in images] == dense_groups.tolist()
    labels = np.array([i.label for i in images])
    assert [i.split for i in images] == grouped_stratified_split(labels, dense_groups, cfg.data.split)
    counts = {s: sum(m.splits[s].counts.values()) for s in ("train", "val", "test")}
    assert abs(counts["test"] / 3216 - 0.15) < 0.01 and abs(counts["val"] / 3216 - 0.15) < 0.01
    total_read = sum(len(batch[0]) for batch in reader.make_dataset(out, "test", batch_size=64, image_size=64))
    assert total_read == counts["test"]


@pytest.mark.parametrize("max_distance", [0, 3, 12, 40])
def test_band_index_finds_exactly_the_pairs_of_the_dense_matrix(max_distance):
    """Random 256-bit hashes with planted neighbours at distances around the limit."""
    rng = np.random.default_rng(max_distance)
    base = rng.random((150, 256)) < 0.5
    # and low-entropy hashes, as a uniform background gives: most bits set in almost every image
    background = rng.random((150, 256)) < np.where(np.arange(256) < 200, 0.97, 0.5)
    base = np.concatenate([base, background])
    planted = []
    for k in range(len(base)):
        flips = rng.choice(256, size=int(rng.integers(0, max_distance + 4)), replace=False)
        twin = base[k].copy()
        twin[flips] ^= True
        planted.append(twin)
    bits = np.concatenate([base, np.stack(planted), np.zeros((3, 256), bool)])  # 3 identical all-zero hashes
    b = bits.astype(np.int32)
    dist = b.sum(1)[:, None] + b.sum(1)[None, :] - 2 * (b @ b.T)
    dense = set(zip(*map(np.ndarray.tolist, np.nonzero(np.triu(dist <= max_distance, k=1)))))
    found = near_duplicate_pairs(bits, max_distance)
    assert len(found) == len(dense) and set(map(tuple, found.tolist())) == dense
    assert len(dense) >= 3  # the all-zero triple at least; planted twins within reach too
    assert near_duplicate_pairs(bits[:1], max_distance).shape == (0, 2)
