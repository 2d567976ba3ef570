"""``python -m bloodcnn``: the same as the ``bloodcnn`` command."""

import sys

from bloodcnn.cli import main

if __name__ == "__main__":
    sys.exit(main())
