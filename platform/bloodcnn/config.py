"""Configuration for every stage, as pydantic models.

One YAML file holds the whole config; the embedded ``defaults.yaml`` is used when none is
given. Any field can be overridden from the environment as ``BLOODCNN__SECTION__FIELD``
(e.g. ``BLOODCNN__TRAIN__EPOCHS=3``), which is how Kubernetes and CI tune a run without
editing files. Invalid values fail at start with the name of the field.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "BLOODCNN__"
CONFIG_ENV = "BLOODCNN_CONFIG"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    """S3 client tuning. Endpoint, region and credentials come from the AWS chain."""

    max_attempts: int = Field(5, ge=1, le=20, description="botocore retry attempts")
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)
    multipart_threshold_mb: int = Field(64, ge=5)
    multipart_chunksize_mb: int = Field(16, ge=5)
    max_concurrency: int = Field(8, ge=1)


class SplitConfig(_Section):
    train: float = Field(0.70, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    seed: int = 42

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:.4f}")
        return self


class AugmentConfig(_Section):
    """Offline augmentation of the train split, as in the seed paper."""

    copies: int = Field(2, ge=0, le=20, description="augmented copies per train image; originals are kept")
    brightness: float = Field(0.2, ge=0, lt=1, description="max relative brightness change")
    min_crop_area: float = Field(0.75, gt=0, le=1, description="random resized crop: smallest area kept")
    horizontal_flip: bool = True
    jpeg_quality: int = Field(95, ge=50, le=100)


class DataConfig(_Section):
    source: str = Field("../shared/data/all-leukemia", description="folder of class sub-folders, local or s3://")
    output: str = Field("s3://bloodcnn/datasets/all-leukemia", description="where shards and manifest.json go")
    class_names: dict[str, str] = Field(
        default_factory=lambda: {"Benign": "Benign", "Early": "Early Pre-B", "Pre": "Pre-B", "Pro": "Pro-B"},
        description="source folder -> class name, in label order; empty means every sub-folder, sorted",
    )
    min_size: int = Field(32, ge=8, description="smallest accepted width/height in pixels")
    on_bad_image: Literal["fail", "skip"] = "fail"
    hash_size: int = Field(16, ge=4, le=32, description="perceptual (average) hash side; bits = hash_size**2")
    near_duplicate_distance: int = Field(12, ge=0, description="max Hamming distance for near-duplicates")
    shard_size: int = Field(256, ge=1, description="images per TFRecord shard")
    split: SplitConfig = Field(default_factory=SplitConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    engine: Literal["auto", "ray", "threads"] = Field(
        "auto", description="ray: Ray Data tasks over the cluster's nodes; threads: this process; "
                            "auto: ray when run as a Ray job ($RAY_ADDRESS) or already connected to Ray")
    workers: int = Field(4, ge=1, description="threads for decoding, hashing and shard writing (threads engine)")

    @field_validator("source", "output")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()


class TrainConfig(_Section):
    dataset: str = Field("s3://bloodcnn/datasets/all-leukemia", description="prepared dataset (folder of manifest.json)")
    image_size: int = Field(224, ge=32, le=512)
    weights: str = Field(
        "../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        description='"imagenet", a local or s3:// .h5 weights file, or "none"',
    )
    dropout: float = Field(0.2, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(32, ge=1, description="per-worker batch")
    epochs: int = Field(2, ge=1, description="phase 1: the new head on the frozen base")
    learning_rate: float = Field(1e-3, gt=0, description="for one worker; scaled by the number of workers")
    fine_tune_epochs: int = Field(8, ge=0, description="phase 2: the top blocks too")
    fine_tune_blocks: int = Field(8, ge=0, le=16, description="top inverted-residual blocks to unfreeze in phase 2")
    fine_tune_learning_rate: float = Field(1e-4, gt=0, description="for one worker; scaled like learning_rate")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="per phase: cosine decay to 0 (after a warm-up in phase 2), or the rate held constant"
    )
    warmup_epochs: float = Field(0.5, ge=0, description="phase 2: linear warm-up to fine_tune_learning_rate (cosine only)")
    class_weighting: Literal["balanced", "none"] = Field(
        "balanced", description="balanced: weight each class by 1/frequency in the train split"
    )
    augment_online: bool = Field(True, description="random 90-degree rotations, flips, brightness and crop per batch")
    cache_images_mb: int = Field(
        1024, ge=0, description="per worker: decode the train and val images once and keep them in memory "
        "(uint8) when they fit in this many MiB, the shuffle buffer included; larger splits are decoded "
        "from the shards every epoch; 0 turns the cache off")
    test_time_augmentation: Literal["none", "flips"] = Field(
        "none", description="flips: answer with the mean probabilities of the image and its 3 flips (4x the "
        "inference compute) in evaluation, calibration, serving and batch scoring; stored with the version")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    storage_path: str = Field("s3://bloodcnn/runs", description="Ray Train checkpoints and results")
    run_name: str = "bloodcnn-train"
    max_failures: int = Field(2, ge=0)
    placement_timeout_s: float = Field(120.0, gt=0)
    seed: int = 0


class GatesConfig(_Section):
    """Metrics a new model must reach before it is promoted automatically."""

    min_accuracy: float = Field(0.0, ge=0, le=1)
    min_macro_f1: float = Field(0.9, ge=0, le=1)


class CalibrationConfig(_Section):
    """Fitted on the validation split after training (bloodcnn.calibration), stored with the version."""

    alpha: float = Field(0.01, gt=0, lt=1, description="conformal miscoverage: sets hold the truth >= 1 - alpha")
    score: Literal["lac", "aps"] = Field(
        "lac", description="lac: 1 - p_true, the smallest sets; aps: cumulative mass, sets adapt to hardness")
    temperature_prior_sigma: float = Field(
        0.25, ge=0, description="spread (in log T) of the temperature's log-normal prior around 1; 0: plain NLL fit")
    referral_share: float = Field(
        0.0, ge=0, lt=1, description="flag at least this share of the validation split's answers: where the "
        "conformal sets flag fewer, the least confident single-class answers are flagged too (their sets hold "
        "their top two classes); 0: sets from the conformal quantile alone")


class ExportConfig(_Section):
    """An optimised inference artifact made at registration (bloodcnn.openvino_runtime)."""

    runtime: Literal["openvino", "none"] = Field("openvino", description="none: TensorFlow serves the version")
    min_agreement: float = Field(0.999, gt=0, le=1, description="argmax agreement with Keras a precision needs")


class RegistryConfig(_Section):
    uri: str = Field("s3://bloodcnn/models", description="model registry root")
    model_name: str = Field("bloodcnn", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    auto_promote: bool = True
    gates: GatesConfig = Field(default_factory=GatesConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(15.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="window over which ongoing requests are averaged")

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServeConfig(_Section):
    model_version: str = Field("production", description='"production" or a pinned version')
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="how long a batch waits for more images (images that queue during a "
        "forward pass join the next one anyway, so a long wait only idles the CPU)")
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus_per_replica: float = Field(
        1.0, gt=0, description="Ray CPUs per model replica, rounded up also its OpenVINO threads: "
        "replicas, not threads, fill a node (two 1-thread replicas served 1.12x one 2-thread replica on 2 cores)")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    uncertain_threshold: float = Field(0.6, ge=0, le=1, description="the threshold rule: top probability under it")
    uncertain_rule: Literal["conformal", "threshold"] = Field(
        "conformal", description="conformal: uncertain unless the prediction set holds exactly one class "
        "(versions without calibration fall back to the threshold rule); threshold: uncertain_threshold only")
    max_images_per_request: int = Field(16, ge=1)
    max_body_mb: float = Field(10.0, gt=0)
    max_pixels: int = Field(40_000_000, ge=1)
    version_poll_s: float = Field(10.0, ge=0, description="0 disables polling for a newly promoted version")
    api_key_env: str = Field("BLOODCNN_API_KEY", description="env var holding the API key; unset means no auth")
    ingress: Literal["separate", "colocated"] = Field(
        "separate", description="separate: an APIIngress deployment calls BloodClassifier replicas (two hops); "
        "colocated: each BloodClassifier replica serves HTTP itself (BloodService, one hop)")
    runtime: Literal["auto", "openvino", "tensorflow"] = Field(
        "auto", description="auto: OpenVINO at the precision the version's gate chose, else TensorFlow; "
        "openvino: the artifact even if its gate failed (at f32); tensorflow: always TensorFlow")
    proxy: Literal["python", "haproxy"] = Field(
        "python", description="python: Ray Serve's HTTP proxy actor; haproxy: Ray Serve's HAProxy mode "
        "(RAY_SERVE_ENABLE_HA_PROXY), HAProxy in front of replicas that serve HTTP themselves. A Ray cluster "
        "setting: applied when bloodcnn starts Ray; a running cluster needs the variable on its nodes")


class AppConfig(_Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """``BLOODCNN__DATA__SPLIT__SEED=7`` -> ``{"data": {"split": {"seed": 7}}}``; values parse as YAML scalars."""
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment override {key} conflicts with another override")
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        env = ENV_PREFIX + "__".join(str(p).upper() for p in e["loc"])
        lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r}; env override: {env})")
    return "\n".join(lines)


def default_config_text() -> str:
    return resources.files("bloodcnn").joinpath("defaults.yaml").read_text()


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> AppConfig:
    """Defaults <- ``base`` <- YAML file (``path`` or ``$BLOODCNN_CONFIG``) <- env overrides <- ``overrides``.

    ``base`` is a caller's own defaults (the main job's short run) that a user's file still beats.
    """
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = _merge(yaml.safe_load(default_config_text()) or {}, base or {})
    origin = "embedded defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = _merge(data, loaded)
        origin = str(p)
    data = _merge(data, _env_overrides(environ))
    data = _merge(data, overrides or {})
    try:
        return AppConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from None
