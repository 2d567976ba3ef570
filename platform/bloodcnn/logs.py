"""Logging set-up for CLIs and jobs: one format, quiet third-party chatter."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | int | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=level or os.environ.get("BLOODCNN_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "matplotlib", "PIL", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
