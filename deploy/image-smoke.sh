#!/usr/bin/env bash
# Build the image with buildah (no Docker daemon) and run it against a real PostgreSQL and Redis:
# /readyz answers, the HEALTHCHECK command passes, the final image has no compiler and runs as
# uid 10001, and SIGTERM drains and exits cleanly.
#
#   sudo deploy/image-smoke.sh DATABASE_URL REDIS_URL
#
# Needs root, buildah, and network access to PyPI. When the python:3.11 base images cannot be
# pulled (no container registry reachable), a stand-in base is made with debootstrap from
# Debian's packages (Debian's python3.11, the same interpreter version) and passed as
# BUILDER_IMAGE/RUNTIME_IMAGE; everything after FROM is the real Dockerfile.
# Not run by the test suite: a build takes a minute or more and a stand-in base a few more.
set -euo pipefail
cd "$(dirname "$0")/.."
DATABASE_URL=${1:?usage: $0 DATABASE_URL REDIS_URL}
REDIS_URL=${2:?usage: $0 DATABASE_URL REDIS_URL}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}   # vfs works inside containers without overlayfs
PORT=${SMOKE_PORT:-18080}
work=$(mktemp -d)
ctr=""
cleanup() {
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

build_args=()
if ! buildah pull -q docker.io/library/python:3.11-slim-bookworm >/dev/null 2>&1; then
  base=localhost/surge-standin-base:3.11
  if ! buildah inspect "$base" >/dev/null 2>&1; then
    echo "== no registry: making a stand-in base image with debootstrap"
    rootfs=$work/rootfs
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log"
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    # trust what this host trusts (a TLS-inspecting proxy's CA, for instance)
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    c=$(buildah from scratch)
    cp -a "$rootfs/." "$(buildah mount "$c")/"
    buildah umount "$c" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
    buildah commit -q "$c" "$base" >/dev/null
    buildah rm "$c" >/dev/null
  fi
  build_args=(--pull-never --build-arg "BUILDER_IMAGE=$base" --build-arg "RUNTIME_IMAGE=$base")
fi

echo "== building"
buildah bud -q --isolation chroot --format docker "${build_args[@]}" -t localhost/surge:smoke .

echo "== image configuration"
buildah inspect --format '{{.Docker.Config.User}} {{.Docker.Config.StopSignal}} {{.Docker.Config.Healthcheck.Test}}' localhost/surge:smoke \
  | tee "$work/config"
grep -q '^10001:10001 SIGTERM .*healthz' "$work/config"

ctr=$(buildah from --pull-never localhost/surge:smoke)
if buildah run --isolation chroot "$ctr" sh -c 'command -v gcc cc g++ make' 2>/dev/null; then
  echo "a compiler is in the final image" >&2; exit 1
fi

echo "== serving on 127.0.0.1:$PORT"
buildah run --isolation chroot \
  --env DATABASE_URL="$DATABASE_URL" --env REDIS_URL="$REDIS_URL" --env PORT="$PORT" \
  --env REDIS_KEY_PREFIX="smoke:" --env JWT_KEYS="smoke:$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
  "$ctr" python -m server serve >"$work/serve.out" 2>"$work/serve.err" &
for _ in $(seq 60); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/readyz', timeout=1)" 2>/dev/null && break
  sleep 0.5
done
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$PORT/readyz', timeout=2).read().decode())"
# the HEALTHCHECK command, as the engine would run it inside the container
buildah run --isolation chroot --env PORT="$PORT" "$ctr" python -c \
  "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/healthz', timeout=2)"
echo "healthcheck ok"

echo "== SIGTERM"
pid=$(pgrep -f '^/opt/venv/bin/python -m server serve' | head -1)
kill -TERM "$pid"
for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
grep -q '"msg":"stopped"' "$work/serve.err" || { cat "$work/serve.err" >&2; exit 1; }
echo "drained and stopped: image smoke test passed"
