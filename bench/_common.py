"""What the bench scripts share: where the repository, the shared dataset and the weights are,
the environment they run in, and the load generator's small helpers.

Run a script as ``.venv/bin/python bench/NAME.py``; Python puts ``bench/`` on ``sys.path``, so
``import _common`` works from each of them.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "all-leukemia"

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `bloodcnn` (installed, else from platform/) and `serving` (repository root) in this process
# and, through PYTHONPATH, in the Ray workers it starts
for _path in (REPO / "platform", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys([str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def multipart_bodies(images: list[bytes], ctype: str = "image/jpeg") -> tuple[str, list[bytes]]:
    """Pre-encoded multipart bodies (one 'file' part each), so the client spends no CPU on encoding."""
    boundary = "bloodcnnbenchboundary7d1e"
    bodies = []
    for i, data in enumerate(images):
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"img{i}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode()
        bodies.append(head + data + f"\r\n--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", bodies


def dataset_jpegs(folder: str | Path, n: int = 64) -> list[bytes]:
    """Up to ``n`` JPEGs spread evenly over ``folder`` (searched recursively)."""
    files = sorted(glob.glob(str(Path(folder) / "**" / "*.jp*g"), recursive=True))
    step = max(1, len(files) // n)
    return [Path(f).read_bytes() for f in files[::step][:n]]


def machine() -> dict:
    """Cores and load average now (figures taken on a busy machine read differently)."""
    one, five, fifteen = os.getloadavg()
    return {"cores": os.cpu_count(), "load_average": [round(one, 2), round(five, 2), round(fifteen, 2)]}


def goal(value, target: str) -> dict:
    """``{"value", "target", "met"}``; ``target`` is "<= 3", ">= 0.9" or "== 0"."""
    op, _, bound = target.partition(" ")
    b = float(bound)
    met = None if value is None else {"<=": value <= b, ">=": value >= b, "==": value == b, "<": value < b}[op]
    return {"value": value, "target": target, "met": met}


def write_result(name: str, command: str, goals: dict, **details) -> Path:
    """``bench/results/<name>.json``: command, date, machine, goals, and any details."""
    import json
    from datetime import datetime, timezone

    out = REPO / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "goals": goals, **details}
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out
