"""Where prepare's two parallel stages run: threads in this process, or Ray Data across a cluster.

Why: one function per stage, written once as a batch UDF (``dict of numpy columns -> dict of
numpy columns``), runs unchanged on either engine. ``data.engine: auto`` picks Ray Data when this
process is a Ray job's driver (``ray job submit`` sets ``RAY_ADDRESS``) or already connected to
Ray, so every node of the cluster validates, hashes and writes shards; a laptop run stays a quick
threaded one without starting Ray. Results come back in input order on both engines, and each
output row says which node made it.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

from bloodcnn import console

Batch = dict[str, np.ndarray]


def use_ray(engine: str) -> bool:
    if engine == "threads":
        return False
    if engine == "ray":
        return True
    ray = sys.modules.get("ray")
    return bool(os.environ.get("RAY_ADDRESS")) or (ray is not None and ray.is_initialized())


def node_id() -> str:
    """The Ray node this code runs on; the host name outside Ray."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


def connect() -> str:
    """Connect to ``$RAY_ADDRESS`` (or the Ray already joined), else start a private local Ray."""
    import ray

    from bloodcnn import lifecycle

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"  # "local": never attach to a stray cluster
        if lifecycle.active() is not None:
            lifecycle.keep_handlers_in_ray()
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
        lifecycle.reinstall()
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    cpus = ray.cluster_resources().get("CPU", 0)
    where = os.environ.get("RAY_ADDRESS") or "a local Ray"
    return f"==> ray: {where}, {nodes} node(s), {cpus:g} CPU(s)"


def quiet_ray_data() -> dict[str, Any]:
    """Ray Data's own bars and banners off (ours is the one), results in input order."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = {"enable_progress_bars": ctx.enable_progress_bars, "print_on_execution_start": ctx.print_on_execution_start,
             "enable_auto_log_stats": ctx.enable_auto_log_stats, "preserve_order": ctx.execution_options.preserve_order}
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.execution_options.preserve_order = True
    return saved


def restore_ray_data(saved: dict[str, Any]) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = saved.pop("preserve_order")
    for k, v in saved.items():
        setattr(ctx, k, v)


def _columns(rows: list[dict[str, Any]]) -> Batch:
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def map_batches(
    fn: Callable[..., Batch], rows: list[dict[str, Any]], *, batch_size: int, workers: int, ray: bool,
    fn_kwargs: dict[str, Any],
) -> Iterator[Batch]:
    """``fn(batch, **fn_kwargs)`` over ``rows`` in batches, outputs in input order.

    Threads: ``workers`` batches at a time; the first failure cancels the batches not started.
    Ray Data: one task per batch (1 CPU each), spread over the cluster's nodes.
    """
    if not rows:
        return
    if ray:
        import ray as ray_module

        saved = quiet_ray_data()  # before the dataset: it keeps a copy of the context it was made in
        try:
            ds = ray_module.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
            ds = ds.map_batches(fn, batch_size=batch_size, batch_format="numpy", num_cpus=1, fn_kwargs=fn_kwargs)
            yield from ds.iter_batches(batch_size=None, batch_format="numpy")
        finally:
            restore_ray_data(saved)
        return
    chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    pool = ThreadPoolExecutor(workers)
    try:
        futures = [pool.submit(fn, _columns(chunk), **fn_kwargs) for chunk in chunks]
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_stage(
    fn: Callable[..., Batch], rows: list[dict[str, Any]], *, total: int, desc: str, batch_size: int, workers: int,
    ray: bool, fn_kwargs: dict[str, Any], progress: bool,
) -> tuple[list[Batch], dict[str, int]]:
    """``map_batches`` under a progress bar of ``total`` images. Every output row has ``node`` and
    ``images`` (how many images it stands for); returns the batches and the images done per node."""
    out: list[Batch] = []
    per_node: Counter[str] = Counter()
    with console.bar(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in map_batches(fn, rows, batch_size=batch_size, workers=workers, ray=ray, fn_kwargs=fn_kwargs):
            out.append(batch)
            for node, n in zip(batch["node"], batch["images"]):
                per_node[str(node)] += int(n)
            bar.update(int(np.sum(batch["images"])))
    return out, dict(per_node)
