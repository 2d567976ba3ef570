#!/usr/bin/env bash
# GPU check: train through the Ray Train job with use_gpu=true (1 worker, mixed precision) on a
# synthetic dataset made and prepared here (no ../shared data, no S3), and print images/s.
#
#   bash bench/gpu_train_check.sh            # ~2-4 minutes on one H100/H200
#   PYTHON=/path/to/python WORKERS=1 EPOCHS=3 IMAGE_SIZE=224 BATCH=64 bash bench/gpu_train_check.sh
#
# Needs a Python with this repo's requirements (tensorflow 2.21 with CUDA, tf_keras, ray[train]).
# Uses the ImageNet weights file when ../shared/weights has it, else random init ("none"):
# throughput does not depend on the weights. Prints a markdown row for docs/benchmarks.md.
# ALLOW_CPU=1 runs the same flow without a GPU (use_gpu=false), to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WORKERS=${WORKERS:-1}
EPOCHS=${EPOCHS:-3}
IMAGE_SIZE=${IMAGE_SIZE:-224}
BATCH=${BATCH:-64}
PER_CLASS=${PER_CLASS:-150}
LIMIT_S=${LIMIT_S:-280}
WORK=${WORK:-$(mktemp -d /tmp/bloodcnn-gpu-XXXXXX)}
WEIGHTS=${WEIGHTS:-../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5}
[[ -f "$WEIGHTS" ]] || WEIGHTS=none
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
export RAY_TRAIN_V2_ENABLED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
"$PYTHON" - <<'EOF'
import os, sys
missing = []
for mod in ("tensorflow", "tf_keras", "ray.train", "bloodcnn"):
    try:
        __import__(mod)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{mod} ({exc.__class__.__name__}: {exc})")
if missing:
    sys.exit("missing Python packages: " + "; ".join(missing) + " -- install the repo's requirements first")
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print(f"python {sys.version.split()[0]}, tensorflow {tf.__version__}, GPUs seen by TF: {len(gpus)}")
if not gpus and os.environ.get("ALLOW_CPU") != "1":
    sys.exit("TensorFlow sees no GPU (a CPU-only tensorflow wheel, or CUDA libraries missing)")
EOF

echo "== synthetic dataset -> $WORK/dataset"
timeout "$LIMIT_S" "$PYTHON" - "$WORK" "$PER_CLASS" "$IMAGE_SIZE" <<'EOF'
import sys
from pathlib import Path
from bloodcnn.config import load_config
from bloodcnn.data.prepare import prepare_dataset, summary_table
from bloodcnn.data.synthetic import make_class_folders
work, per_class, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
src = make_class_folders(work / "src", per_class=per_class, size=size)
cfg = load_config(environ={}, overrides={"data": {
    "source": str(src), "output": str(work / "dataset"), "shard_size": 64, "augment": {"copies": 1},
    "near_duplicate_distance": 0, "workers": 8}})
print(summary_table(prepare_dataset(cfg, progress=False)))
EOF

echo "== Ray Train job, use_gpu=true, $WORKERS worker(s), ${IMAGE_SIZE} px, batch $BATCH/worker, $EPOCHS+1 epochs"
timeout "$LIMIT_S" "$PYTHON" - "$WORK" "$WORKERS" "$EPOCHS" "$IMAGE_SIZE" "$BATCH" "$WEIGHTS" <<'EOF'
import os, statistics, sys, time
from pathlib import Path
work, workers, epochs, size, batch, weights = Path(sys.argv[1]), *map(int, sys.argv[2:6]), sys.argv[6]
from bloodcnn.config import load_config
from bloodcnn.logs import setup_logging
from bloodcnn.train.job import run_training
setup_logging()
import ray
ray.init(address="local", include_dashboard=False)
print("cluster resources:", ray.cluster_resources())
cpus = max(1, int(ray.cluster_resources().get("CPU", 2)) // workers - 1)
cfg = load_config(environ={}, overrides={
    "train": {"dataset": str(work / "dataset"), "weights": weights if weights == "none" else os.path.abspath(weights),
              "image_size": size, "batch_size": batch, "epochs": epochs, "fine_tune_epochs": 1,
              "num_workers": workers, "use_gpu": os.environ.get("ALLOW_CPU") != "1", "gpus_per_worker": 1, "cpus_per_worker": cpus,
              "storage_path": str(work / "runs"), "run_name": f"gpu-check-{int(time.time())}"},
    "registry": {"uri": str(work / "models"), "auto_promote": False}})
t0 = time.time()
meta = run_training(cfg)
tr = meta.metrics["training"]
head = [h for h in tr["history"] if h["phase"] == "head"][1:] or tr["history"][:1]
ft = [h for h in tr["history"] if h["phase"] == "fine_tune"]
ips_head = statistics.mean(h["images_per_s"] for h in head)
ips_ft = statistics.mean(h["images_per_s"] for h in ft) if ft else float("nan")
gpu = os.popen("nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null").read().strip() or "GPU"
print()
print(f"GPU training: {ips_head:.0f} img/s frozen backbone, {ips_ft:.0f} img/s fine-tuning "
      f"(mixed precision: {tr['mixed_precision']}, {workers} worker(s), global batch {tr['global_batch_size']}); "
      f"run {time.time() - t0:.0f}s, test accuracy {meta.metrics['accuracy']:.3f} on synthetic data")
print()
print("| device | workers | image px | batch/worker | img/s (frozen) | img/s (fine-tune) | mixed precision |")
print("|---|---|---|---|---|---|---|")
print(f"| {gpu} | {workers} | {size} | {batch} | {ips_head:.0f} | {ips_ft:.0f} | {tr['mixed_precision']} |")
ray.shutdown()
EOF
