"""``manifest.json``: the record of a prepared dataset, written last so its presence means complete."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val", "test")


class DatasetError(RuntimeError):
    """Bad or missing input data; the message names the file and what is wrong."""


class ShardChecksumError(DatasetError):
    pass


class ShardInfo(BaseModel):
    path: str = Field(description="relative to the dataset root")
    sha256: str
    size: int
    count: int


class SplitInfo(BaseModel):
    counts: dict[str, int] = Field(description="original (non-augmented) images per class name")
    augmented: int = 0
    total: int
    shards: list[ShardInfo]


class ImageEntry(BaseModel):
    id: str = Field(description="sha256 of the file bytes")
    source: str = Field(description="path relative to the source root")
    label: int
    split: str
    group: int = Field(description="near-duplicate group; a group never spans two splits")


class BadImage(BaseModel):
    path: str
    reason: str


class DuplicateEntry(BaseModel):
    removed: str
    kept: str


class Manifest(BaseModel):
    format_version: int = 1
    dataset_version: str
    created_at: str
    source: str
    class_names: list[str]
    class_folders: list[str]
    seed: int
    splits: dict[str, SplitInfo]
    config: dict[str, Any]
    scanned: int
    bad_images: list[BadImage] = Field(default_factory=list)
    exact_duplicates: list[DuplicateEntry] = Field(default_factory=list)
    near_duplicate_groups: int = Field(0, description="groups with more than one unique image")
    images: list[ImageEntry]
    plots: list[str] = Field(default_factory=list)
    nodes: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="per stage, the images each node (a Ray node id, or a host) did")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def unique_images(self) -> int:
        return len(self.images)

    def balanced_class_weights(self, split: str = "train") -> list[float]:
        """``n / (classes * n_class)`` per class, in label order: every class weighs the same in the
        loss, and the weights average to 1 over the split, so the loss keeps its scale."""
        counts = [self.splits[split].counts.get(name, 0) for name in self.class_names]
        missing = [name for name, n in zip(self.class_names, counts) if n == 0]
        if missing:
            raise DatasetError(f"the {split} split has no images of {', '.join(missing)}")
        total = sum(counts)
        return [total / (len(counts) * n) for n in counts]
