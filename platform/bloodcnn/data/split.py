"""De-duplication and the leak-free, stratified, grouped train/val/test split.

Why: this dataset holds byte-identical pairs and near-duplicates. Exact copies are collapsed
to one image; near-duplicates (perceptual hash within ``near_duplicate_distance`` bits) are
joined into groups with union-find (scipy's connected components), and a whole group always
lands in one split. Groups are then dealt out per class, seeded, so every split keeps the
class balance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from bloodcnn.config import SplitConfig
from bloodcnn.data.catalog import CatalogEntry
from bloodcnn.data.manifest import DatasetError, DuplicateEntry, SPLITS


@dataclass
class SplitResult:
    unique: list[CatalogEntry]
    duplicates: list[DuplicateEntry]
    groups: np.ndarray  # group id per unique entry
    splits: list[str]  # split name per unique entry


def collapse_exact(entries: list[CatalogEntry]) -> tuple[list[CatalogEntry], list[DuplicateEntry]]:
    """Keep the first file (by source path) of each sha256; refuse one image filed under two classes."""
    kept: dict[str, CatalogEntry] = {}
    dups: list[DuplicateEntry] = []
    for e in sorted(entries, key=lambda e: e.source):
        first = kept.get(e.sha256)
        if first is None:
            kept[e.sha256] = e
        elif first.label != e.label:
            raise DatasetError(f"the same image is filed under two classes: {first.source} and {e.source}")
        else:
            dups.append(DuplicateEntry(removed=e.source, kept=first.source))
    return sorted(kept.values(), key=lambda e: e.source), dups


def near_duplicate_groups(entries: list[CatalogEntry], max_distance: int) -> np.ndarray:
    """Group ids from the Hamming-distance graph of the perceptual hashes."""
    n = len(entries)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.stack([e.ahash for e in entries]).astype(np.float32)
    # Hamming distance for all pairs at once: d = |a| + |b| - 2 a.b
    ones = bits.sum(axis=1)
    dist = ones[:, None] + ones[None, :] - 2.0 * (bits @ bits.T)
    rows, cols = np.nonzero(np.triu(dist <= max_distance + 0.5, k=1))
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def grouped_stratified_split(
    labels: np.ndarray, groups: np.ndarray, cfg: SplitConfig
) -> list[str]:
    """Assign each item a split so groups stay whole and each class follows the ratios."""
    fractions = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    out = [""] * len(labels)
    rng = np.random.default_rng(cfg.seed)
    for cls in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == cls)
        # a group belongs to the class of most of its members
        cls_groups = sorted({int(g) for g in groups[members]})
        group_items = {g: np.flatnonzero(groups == g) for g in cls_groups}
        cls_groups = [g for g in cls_groups if np.bincount(labels[group_items[g]]).argmax() == cls]
        rng.shuffle(cls_groups)
        total = sum(len(group_items[g]) for g in cls_groups)
        assigned = {s: 0 for s in SPLITS}
        for g in cls_groups:
            # the split furthest below its target share takes the next group
            split = max(SPLITS, key=lambda s: (fractions[s] * total - assigned[s], -SPLITS.index(s)))
            for i in group_items[g]:
                out[i] = split
            assigned[split] += len(group_items[g])
    assert all(out), "every item must receive a split"
    return out


def split_catalog(entries: list[CatalogEntry], max_distance: int, cfg: SplitConfig) -> SplitResult:
    unique, dups = collapse_exact(entries)
    groups = near_duplicate_groups(unique, max_distance)
    labels = np.array([e.label for e in unique])
    splits = grouped_stratified_split(labels, groups, cfg)
    return SplitResult(unique, dups, groups, splits)
