"""Training: the Ray Train data-parallel loop, the driver job, evaluation and plots.

``job.run_training`` is the entry point (CLI ``bloodcnn train``, ``jobs/train.py``);
``evaluate.evaluate_registered`` re-runs the test-split evaluation of a stored model.
"""

import os

# Ray Train V2 is selected by this variable when ray.train is first imported; set it before.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
