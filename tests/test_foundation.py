"""Config, storage and the SeaweedFS helper, against a real S3 server."""

from __future__ import annotations

import os
import socket

import pytest

from bloodcnn import ports, storage
from bloodcnn.config import ConfigError, load_config
from bloodcnn.s3server import S3Server


def test_defaults_load_and_env_overrides_win(tmp_path):
    cfg = load_config(environ={})
    assert cfg.data.split.train == 0.70 and cfg.train.image_size == 224
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 9\ndata:\n  split: {seed: 3}\n")
    cfg = load_config(f, environ={"BLOODCNN__TRAIN__EPOCHS": "2", "BLOODCNN__SERVE__AUTOSCALING__MAX_REPLICAS": "5"})
    assert cfg.train.epochs == 2 and cfg.data.split.seed == 3 and cfg.serve.autoscaling.max_replicas == 5


@pytest.mark.parametrize(
    "text, field",
    [
        ("data:\n  split: {train: 0.9, val: 0.2, test: 0.1}\n", "data.split"),
        ("train:\n  batch_size: -1\n", "train.batch_size"),
        ("serve:\n  autoscaling: {min_replicas: 4, max_replicas: 2}\n", "serve.autoscaling"),
        ("data:\n  on_bad_image: ignore\n", "data.on_bad_image"),
        ("trian:\n  epochs: 1\n", "trian"),
    ],
)
def test_invalid_config_names_the_field(tmp_path, text, field):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, environ={})
    assert field in str(err.value)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_s3_round_trip_multipart_and_listing(s3_prefix, tmp_path):
    from bloodcnn.config import StorageConfig

    store = storage.store_for(s3_prefix, StorageConfig(multipart_threshold_mb=5, multipart_chunksize_mb=5))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))
    store.upload_file(big, storage.join(s3_prefix, "big.bin"))
    bucket, key = storage.split_s3(storage.join(s3_prefix, "big.bin"))
    etag = store.client.head_object(Bucket=bucket, Key=key)["ETag"]
    assert "-" in etag, "a 12 MiB upload with a 5 MiB threshold must be multipart"
    store.download_file(storage.join(s3_prefix, "big.bin"), tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    store.write_bytes(storage.join(s3_prefix, "a/x.txt"), b"x")
    assert list(store.list(storage.join(s3_prefix, "a"))) == [storage.join(s3_prefix, "a/x.txt")]
    with pytest.raises(storage.ObjectNotFound):
        store.read_bytes(storage.join(s3_prefix, "missing"))


def test_credentials_never_in_repr_or_errors(s3_server, s3_prefix, monkeypatch):
    store = storage.store_for(s3_prefix)
    assert s3_server.secret_key not in repr(store) and s3_server.secret_key not in repr(s3_server)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-42")
    storage._s3_store.cache_clear()
    try:
        with pytest.raises(storage.StorageError) as err:
            storage.read_bytes(storage.join(s3_prefix, "x"))
        assert "rejected the credentials" in str(err.value)
        assert "wrong-secret-value-42" not in str(err.value) and s3_server.secret_key not in str(err.value)
    finally:
        storage._s3_store.cache_clear()


def test_local_writes_are_atomic(tmp_path):
    target = tmp_path / "d" / "f.bin"
    storage.write_bytes(str(target), b"one")
    storage.write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_second_seaweedfs_server_starts_and_stops_cleanly():
    with S3Server(buckets=("scratch",)) as server:
        client = server.client()
        client.put_object(Bucket="scratch", Key="k", Body=b"v")
        assert client.get_object(Bucket="scratch", Key="k")["Body"].read() == b"v"
        proc = server._proc
        data_dir = server.data_dir
    assert proc.poll() is not None
    assert not data_dir.exists()


def test_free_ports_stay_outside_the_ephemeral_range(monkeypatch):
    """Ports chosen for servers that bind later must not be ones outgoing connections can take."""
    ephemeral = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    taken: set[int] = set()
    chosen = [ports.free_port(twin_offset=10_000, taken=taken) for _ in range(40)]
    assert len(set(chosen)) == 40 and len(taken) == 80
    for port in chosen:
        assert ports.LOWEST <= port and port + 10_000 < ephemeral, port
    with socket.socket() as held:  # a port in use is skipped
        held.bind(("127.0.0.1", chosen[0]))
        draws = iter(chosen[:2])
        monkeypatch.setattr(ports.random, "randrange", lambda lo, hi: next(draws))
        assert ports.free_port() == chosen[1]
