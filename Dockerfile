# Surge container image. Two stages: the builder turns requirements.lock into wheels and a venv,
# then installs the surge package into it (it has compilers, in case a pinned package ships no
# wheel for this platform); the runtime stage copies only the venv, so no compiler, build tool
# or source tree reaches production.
#
#   docker build -t surge .                               (or: buildah bud --format docker -t surge .)
#   docker run -e DATABASE_URL=... -e REDIS_URL=... -e JWT_KEYS=... -p 8080:8080 surge
#   docker run ... surge surge migrate                    (the one-off migration job)
#
# The image needs DATABASE_URL and REDIS_URL: the embedded PostgreSQL/Redis used by `make run`
# are development conveniences and are left out of it.

ARG PYTHON_VERSION=3.11
ARG BUILDER_IMAGE=python:${PYTHON_VERSION}-bookworm
ARG RUNTIME_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

FROM ${BUILDER_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /build
COPY pyproject.toml requirements.lock ./
# requirements.lock pins the dev and bench extras too, after its runtime section: the image
# takes that section alone, every file checked against its sha256.
RUN sed -n '/^# --- runtime ---$/,/^# --- /p' requirements.lock > runtime.txt \
 && python -m pip wheel --require-hashes --wheel-dir /wheels -r runtime.txt \
 && python -m venv --without-pip /opt/venv \
 && python -m pip --python /opt/venv/bin/python install --no-index --find-links /wheels \
        --require-hashes -r runtime.txt
# The package itself last, so a source change rebuilds only this layer.
COPY server ./server
COPY handlers ./handlers
COPY db ./db
COPY sql ./sql
RUN python -m pip --python /opt/venv/bin/python install --no-deps . \
 && cd / && /opt/venv/bin/surge --version \
 && /opt/venv/bin/python -c "import aiohttp, asyncpg, uvloop, orjson, redis, prometheus_client, argon2, server.app, handlers"

FROM ${RUNTIME_IMAGE} AS runtime
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 surge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin surge
# One worker unless told otherwise: scale with replicas, or set WORKERS=0 to follow the
# container's CPU quota (cgroup cpu.max), never the host's core count.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    WORKERS=1
# The venv holds the package, owned by root and read-only to the server's user, byte-compiled by
# pip at install (the root filesystem is read-only at run time).
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/healthz', timeout=2)"]
CMD ["python", "-m", "server", "serve"]
