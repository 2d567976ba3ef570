"""Ray job entrypoint for the data pipeline: the same as ``bloodcnn data prepare``.

    ray job submit --working-dir . -- python jobs/prepare_data.py --config config.yaml
"""

import sys

from bloodcnn.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
