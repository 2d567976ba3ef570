# bloodcnn image: Ray 2.60.0 on Python 3.11 with the project's pinned dependencies
# (pyproject.toml). The same image runs the Ray Serve app (serving.app:app), the training job
# (jobs/train.py) and the data preparation job (jobs/prepare_data.py) on KubeRay.
#
#   docker build -t bloodcnn:dev .
#   docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#     --build-arg EXTRA_PIP_PACKAGES="tensorflow[and-cuda]==2.21.0" -t bloodcnn:dev-gpu .
#
# The Helm chart takes the repository and tag from values (image.repository, image.tag) and
# expects the code in image.workingDir (/home/ray/app) and uid 1000 / gid 100 (the ray user).
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311
FROM ${BASE_IMAGE}
# Extra pip requirements, e.g. "tensorflow[and-cuda]==2.21.0" (CUDA libraries) for GPU images.
ARG EXTRA_PIP_PACKAGES=""

LABEL org.opencontainers.image.title="bloodcnn" \
      org.opencontainers.image.description="MobileNetV2 blood-cancer (ALL) classifier: Ray Train + Ray Serve" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# The code lives in a folder owned by the ray user (uid 1000, gid 100 "users").
USER root
RUN mkdir -p /home/ray/app && chown 1000:100 /home/ray/app
USER 1000:100
WORKDIR /home/ray/app

# 1. Third-party dependencies, pinned in pyproject.toml (this layer is reused until it changes).
COPY --chown=1000:100 pyproject.toml README.md* ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt ${EXTRA_PIP_PACKAGES} \
 && rm -f /tmp/requirements.txt

# 2. The bloodcnn package itself (pip install . from pyproject.toml; dependencies are in place).
COPY --chown=1000:100 platform ./platform
RUN pip install --no-deps . \
 && rm -rf build platform/*.egg-info \
 && python -c "import bloodcnn, bloodcnn.config, ray; assert ray.__version__ == '2.60.0', ray.__version__"

# 3. Entrypoints: the Ray jobs and the Ray Serve application (import path serving.app:app).
COPY --chown=1000:100 jobs ./jobs
COPY --chown=1000:100 serving ./serving

# Ray imports serving.app from here; the chart sets the same. Caches go to /tmp, which the chart
# mounts as an emptyDir because the root filesystem is read-only there.
ENV PYTHONPATH=/home/ray/app \
    KERAS_HOME=/tmp/keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache

# Ray GCS, dashboard, client, Serve HTTP, metrics.
EXPOSE 6379 8265 10001 8000 8080
