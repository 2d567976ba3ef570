"""Near-duplicate pair search (pigeonhole band index) at 10k, 100k and 300k images: time and memory.

Random 256-bit hashes (the default 16 x 16 average hash), half of them planted twins 6 bits away
from another, searched at the default limit of 12 bits. The dense n x n matrix it replaced would
need n² floats (360 GB at 300,000), so there is no baseline to run beside it.

    .venv/bin/python bench/near_duplicates.py
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

from _common import goal, write_result


def planted_hashes(n: int, rng: np.random.Generator, flips: int = 6) -> np.ndarray:
    base = rng.random((n // 2, 256)) < 0.5
    twin = base.copy()
    rows = np.arange(n // 2)
    for col in rng.integers(0, 256, size=(flips, n // 2)):
        twin[rows, col] ^= True
    return np.concatenate([base, twin])


def main() -> int:
    from bloodcnn.data.split import near_duplicate_pairs

    rng = np.random.default_rng(0)
    rows = []
    for n in (10_000, 100_000, 300_000):
        bits = planted_hashes(n, rng)
        t0 = time.perf_counter()
        pairs = near_duplicate_pairs(bits, 12)
        dt = time.perf_counter() - t0
        rows.append({"images": n, "pairs": int(len(pairs)), "seconds": round(dt, 3),
                     "us_per_image": round(dt / n * 1e6, 2),
                     "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024})
        print(f"{n:>8,} images: {len(pairs):,} pairs in {dt:.2f} s ({dt / n * 1e6:.1f} µs/image), "
              f"peak RSS {rows[-1]['peak_rss_mb']} MB", flush=True)
    out = write_result("near-duplicates", "python bench/near_duplicates.py", {
        "pairs_found_all_planted": goal(all(r["pairs"] >= r["images"] // 2 for r in rows), "== 1"),
        "peak_rss_mb_300k": goal(rows[-1]["peak_rss_mb"], "<= 2048"),
    }, sizes=rows, us_per_image_ratio_300k_over_10k=round(rows[-1]["us_per_image"] / rows[0]["us_per_image"], 2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
