"""Ray job entrypoint for batch scoring: the same as ``bloodcnn predict``.

    ray job submit --working-dir . -- python jobs/predict.py --input s3://bucket/images \\
        --output s3://bucket/scores/predictions.parquet [--model production|VERSION] [--actors N]
    python jobs/predict.py --input DIR --output predictions.parquet          # starts a local Ray

Exit status 0 after the Parquet file is written; 2 with a one-line error on bad input (no image,
missing path, S3 credentials, unknown model version) or a failed run; 130/143 after SIGINT/SIGTERM.
"""

import sys
from pathlib import Path

try:
    import bloodcnn  # noqa: F401
except ImportError:  # running from a checkout (e.g. the uploaded working dir) without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from bloodcnn.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
