"""De-duplication and the leak-free, stratified, grouped train/val/test split.

Why: this dataset holds byte-identical pairs and near-duplicates. Exact copies are collapsed
to one image; near-duplicates (perceptual hash within ``near_duplicate_distance`` bits) are
joined into groups with union-find (scipy's connected components), and a whole group always
lands in one split. Candidate pairs come from a pigeonhole band index (``near_duplicate_pairs``),
so the cost grows with the number of images, not its square, and the groups stay exact. Groups
are then dealt out per class, seeded, so every split keeps the class balance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

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


def _pairs_sharing_a_key(keys: np.ndarray) -> Iterator[np.ndarray]:
    """``[P, 2]`` index pairs (i < j) of the rows of ``keys`` (one key per row) that are equal,
    a slice at a time: rows ``offset`` apart in the sorted order that are still in one run of equal
    keys. A slice holds at most ``len(keys)`` pairs, however large the buckets."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    run = np.cumsum(np.r_[0, sorted_keys[1:] != sorted_keys[:-1]])  # run id of each sorted row
    for offset in range(1, len(run)):
        same = np.flatnonzero(run[offset:] == run[:-offset])
        if not len(same):
            return
        a, b = order[same], order[same + offset]
        yield np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)


def _words(bits: np.ndarray) -> np.ndarray:
    """``[n, W]`` uint64: each row's bits packed into zero-padded 64-bit words."""
    packed = np.packbits(bits, axis=1)
    padded = np.zeros((len(packed), -(-packed.shape[1] // 8) * 8), dtype=np.uint8)
    padded[:, :packed.shape[1]] = packed
    return padded.view(np.uint64)


def _band_keys(band_bits: np.ndarray) -> np.ndarray:
    """One sortable key per row: a uint64 when the band fits in 64 bits (sorted about 2x faster
    than raw bytes), else the row's words as one bytes key."""
    words = _words(band_bits)
    if words.shape[1] == 1:
        return words[:, 0].copy()
    return np.ascontiguousarray(words).view(f"V{8 * words.shape[1]}").ravel()


def near_duplicate_pairs(bits: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair (i < j) of hashes within ``max_distance`` bits, exactly, without the n x n matrix.

    Pigeonhole: deal the hash's bits into ``max_distance + 1`` bands; two hashes that differ in at
    most ``max_distance`` bits agree on at least one band. Pairs that share a band are candidates,
    each checked with its exact Hamming distance as soon as it is made, so only the pairs found are
    held: memory follows the images and the near-duplicates, not the candidates (which grow with
    the square of a band's bucket).
    """
    n, nbits = bits.shape
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    if max_distance >= nbits:  # every pair is within reach
        i, j = np.triu_indices(n, k=1)
        return np.stack([i, j], axis=1).astype(np.int64)
    # Any partition of the bits into bands keeps the pigeonhole exact, so deal the bits out by
    # entropy, round-robin: each band gets its share of informative bits. Bands cut in bit order
    # from a low-entropy hash (a uniform background sets the same bits in every image) give one
    # huge bucket, and candidates that grow with its square.
    p = bits.mean(axis=0)
    entropy = -(p * np.log2(np.clip(p, 1e-12, 1)) + (1 - p) * np.log2(np.clip(1 - p, 1e-12, 1)))
    by_entropy = np.argsort(-entropy, kind="stable")
    words = [np.ascontiguousarray(w) for w in _words(bits).T]  # one column per word: fast gathers
    found = [np.empty(0, dtype=np.int64)]
    for band in (by_entropy[k::max_distance + 1] for k in range(max_distance + 1)):
        for candidates in _pairs_sharing_a_key(_band_keys(bits[:, band])):
            a, b = candidates.T
            distance = np.zeros(len(a), dtype=np.int64)
            for w in words:  # a few 64-bit popcounts per pair, not one per byte
                distance += np.bitwise_count(w[a] ^ w[b])
            near = distance <= max_distance
            found.append(a[near] * n + b[near])
    return np.stack(np.divmod(np.unique(np.concatenate(found)), n), axis=1)  # sorted, each pair once


def near_duplicate_groups(entries: list[CatalogEntry], max_distance: int) -> np.ndarray:
    """Group ids: connected components of the graph of near-duplicate pairs."""
    n = len(entries)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.stack([np.asarray(e.ahash, dtype=bool).ravel() for e in entries])
    pairs = near_duplicate_pairs(bits, max_distance)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def grouped_stratified_split(
    labels: np.ndarray, groups: np.ndarray, cfg: SplitConfig
) -> list[str]:
    """Assign each item a split so groups stay whole and each class follows the ratios."""
    fractions = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    out = [""] * len(labels)
    rng = np.random.default_rng(cfg.seed)
    order = np.argsort(groups, kind="stable")  # each group's members, ascending, in one pass
    runs = np.split(order, np.flatnonzero(np.diff(groups[order])) + 1)
    group_items = {int(groups[run[0]]): run for run in runs if len(run)}
    for cls in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == cls)
        # a group belongs to the class of most of its members
        cls_groups = sorted({int(g) for g in groups[members]})
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
