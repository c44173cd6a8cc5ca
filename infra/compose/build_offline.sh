#!/bin/sh
# Offline build of everything the compose stack needs that would otherwise come from a container
# registry, for machines where `docker pull` fails but the Debian mirror and PyPI (or local wheel
# dirs) are reachable:
#
#   1. creditflow/base:bookworm     Debian bookworm (debootstrap --variant=minbase) with python3,
#                                   a venv at /opt/venv on PATH (python/pip like python:3.11-slim)
#                                   and Debian's postgresql-15; loaded with `docker import`;
#   2. creditflow/postgres:15-bookworm  infra/compose/Dockerfile.postgres on top of 1 (a stand-in
#                                   for the official postgres image: POSTGRES_* env, initdb,
#                                   /docker-entrypoint-initdb.d, pg_isready);
#   3. infra/compose/wheels/*.whl   the wheelhouse (`pip wheel`, this machine's pip config: torch is
#                                   the CPU build) from which infra/compose/Dockerfile installs
#                                   without network;
#   4. infra/compose/.env           when missing: random database passwords + the two images.
#
# Idempotent: every step is skipped when its result exists (FORCE=1 redoes 1-3). Needs root
# (debootstrap, chroot), a reachable Docker engine, debootstrap, and Python 3.11 for `pip wheel`
# (the base image's Python is 3.11: wheels must match). Then:
#
#   docker-compose -p creditflow -f infra/compose/docker-compose.yml up -d --build
#   (or: docker compose -p creditflow -f infra/compose/docker-compose.yml up -d --build)
#
# Settings (environment): MIRROR (default http://deb.debian.org/debian), SUITE (bookworm),
# BASE_IMAGE, POSTGRES_IMAGE (tags), WORKDIR (rootfs scratch dir, removed afterwards),
# PYTHON (interpreter for `pip wheel`; default: the repo's .venv, else python3),
# TORCH_INDEX_URL (extra index for `pip wheel`, e.g. https://download.pytorch.org/whl/cpu on a
# connected machine whose pip has no CPU torch), FORCE=1, NO_ENV=1 (never write .env).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
BASE_IMAGE=${BASE_IMAGE:-creditflow/base:bookworm}
POSTGRES_IMAGE=${POSTGRES_IMAGE:-creditflow/postgres:15-bookworm}
WORKDIR=${WORKDIR:-/var/tmp/creditflow-offline-build}
FORCE=${FORCE:-0}
PACKAGES=python3,python3-venv,postgresql-15,ca-certificates,procps,tini
WHEELS=$HERE/wheels
T0=$(date +%s)

die() { echo "build_offline: error: $*" >&2; exit 1; }
say() { echo "build_offline: $*"; }
took() { say "$1 took $(( $(date +%s) - $2 )) s"; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

command -v docker >/dev/null 2>&1 || die "docker CLI not found (apt-get install -y docker.io)"
docker info >/dev/null 2>&1 || die "Docker engine not reachable (start it: systemctl start docker, or: nohup dockerd > /tmp/dockerd.log 2>&1 &)"

# ------------------------------------------------------------------ 1. base image (debootstrap)
if [ "$FORCE" != 1 ] && have_image "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE exists, skipped"
else
    [ "$(id -u)" = 0 ] || die "building $BASE_IMAGE needs root (debootstrap, chroot): run with sudo"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found (apt-get install -y debootstrap)"
    python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=15)" \
        "$MIRROR/dists/$SUITE/Release" 2>/dev/null \
        || die "Debian mirror $MIRROR/dists/$SUITE/Release not reachable (set MIRROR=... to a reachable mirror)"
    t=$(date +%s)
    rootfs=$WORKDIR/rootfs
    rm -rf "$rootfs"
    mkdir -p "$WORKDIR"
    say "debootstrap $SUITE ($PACKAGES) from $MIRROR into $rootfs (a few minutes) ..."
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
        > "$WORKDIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORKDIR/debootstrap.log" >&2; die "debootstrap failed (log: $WORKDIR/debootstrap.log)"; }
    took "debootstrap" "$t"
    t=$(date +%s)
    # python/pip on PATH like python:3.11-slim: a venv at /opt/venv (ensurepip: Debian's pip wheel)
    chroot "$rootfs" /usr/bin/python3 -m venv /opt/venv || die "python3 -m venv in the rootfs failed"
    chroot "$rootfs" /opt/venv/bin/python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version"
    # Debian's package made a cluster and may have left a pid file; the image must hold no data
    rm -rf "$rootfs/var/lib/postgresql/15" "$rootfs/etc/postgresql/15/main" "$rootfs/var/run/postgresql/"*.pid
    rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"* "$rootfs/tmp/"* \
           "$rootfs/var/log/"*.log
    printf 'deb %s %s main\n' "$MIRROR" "$SUITE" > "$rootfs/etc/apt/sources.list"
    tar --numeric-owner -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python"]' \
        --message "creditflow offline base: debootstrap $SUITE minbase + $PACKAGES" \
        - "$BASE_IMAGE" >/dev/null || die "docker import of the rootfs failed"
    rm -rf "$WORKDIR"
    took "base image $BASE_IMAGE (venv, import)" "$t"
fi

# ------------------------------------------------------------------ 2. postgres image
if [ "$FORCE" != 1 ] && have_image "$POSTGRES_IMAGE" \
   && [ "$(docker image inspect -f '{{index .Config.Labels "creditflow.base"}}' "$POSTGRES_IMAGE")" = \
        "$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")" ]; then
    say "postgres image $POSTGRES_IMAGE exists, skipped"
else
    t=$(date +%s)
    # classic builder or BuildKit alike: the context is the small infra/compose/postgres dir
    docker build -q -f "$HERE/Dockerfile.postgres" --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --label "creditflow.base=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")" \
        -t "$POSTGRES_IMAGE" "$HERE/postgres" >/dev/null || die "docker build of $POSTGRES_IMAGE failed"
    took "postgres image $POSTGRES_IMAGE" "$t"
fi

# ------------------------------------------------------------------ 3. wheelhouse
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))" \
    || die "$PYTHON is not Python 3.11 (the image's Python): set PYTHON=/path/to/python3.11"
req=$(mktemp)
trap 'rm -f "$req"' EXIT
chmod 644 "$req"
# the same requirements as infra/compose/Dockerfile installs, extras included (world-readable: mounted into a container)
(cd "$ROOT" && "$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))') > "$req"
printf 'psycopg[binary]>=3.2\nsetuptools>=68\nwheel\n' >> "$req"
# Complete = every requirement resolves from the wheelhouse alone, checked by the image's own pip
# and Python (3.11.2 in bookworm: environment markers such as python_full_version < "3.11.3" can
# pull packages the host's newer 3.11 does not need). Prints pip's last error line when incomplete.
check() {
    ls "$WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1 || { echo "no CPU torch wheel"; return 1; }
    out=$(docker run --rm --network none -v "$WHEELS:/wheels:ro" -v "$req:/tmp/requirements.txt:ro" \
          "$BASE_IMAGE" pip install -q --disable-pip-version-check --dry-run --ignore-installed \
          --no-index --find-links=/wheels -r /tmp/requirements.txt 2>&1) && return 0
    echo "$out" | grep '^ERROR' | tail -n 1
    return 1
}
if [ "$FORCE" != 1 ] && check >/dev/null; then
    say "wheelhouse $WHEELS complete, skipped"
else
    t=$(date +%s)
    say "pip wheel into $WHEELS (this machine's pip config and indexes) ..."
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip wheel -q -w "$WHEELS" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r "$req" \
        2>&1 | grep -v "^WARNING: Location .* is ignored" >&2 || true
    if ls "$WHEELS"/nvidia_* >/dev/null 2>&1 || ! ls "$WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1; then
        die "the wheelhouse has no CPU torch wheel (or CUDA wheels): rm $WHEELS/*.whl and rerun with TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    fi
    # what only the image's Python needs (markers): add it, until the image's pip is satisfied
    n=0
    while ! err=$(check); do
        missing=$(echo "$err" | sed -n 's/.*No matching distribution found for \([^;]*\).*/\1/p' | tr -d ' ')
        n=$((n + 1))
        [ -n "$missing" ] && [ "$n" -le 20 ] \
            || die "the wheelhouse $WHEELS does not satisfy the requirements in $BASE_IMAGE: $err"
        say "the image's Python also needs $missing: adding it"
        "$PYTHON" -m pip wheel -q -w "$WHEELS" "$missing" 2>&1 | grep -v "^WARNING: Location .* is ignored" >&2 || true
    done
    took "wheelhouse ($(du -sh "$WHEELS" | cut -f1))" "$t"
fi

# ------------------------------------------------------------------ build context, .env
if ! cmp -s "$ROOT/.dockerignore" "$HERE/Dockerfile.dockerignore"; then
    say "warning: $ROOT/.dockerignore differs from infra/compose/Dockerfile.dockerignore:" \
        "docker-compose v1 (legacy builder) would send a large build context"
fi
settings="PYTHON_IMAGE=$BASE_IMAGE
POSTGRES_IMAGE=$POSTGRES_IMAGE"
if [ ! -e "$HERE/.env" ] && [ "${NO_ENV:-0}" != 1 ]; then
    umask 077
    pw() { "$PYTHON" -c "import secrets; print(secrets.token_urlsafe(24))"; }
    { sed -e "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$(pw)/" \
          -e "s/^MLFLOW_DB_PASSWORD=.*/MLFLOW_DB_PASSWORD=$(pw)/" "$HERE/env.example"
      printf '\n# images built offline by infra/compose/build_offline.sh\n%s\n' "$settings"; } > "$HERE/.env"
    say "wrote $HERE/.env (random database passwords, the images below)"
else
    say "use these settings (in infra/compose/.env or the environment):"
fi
echo "$settings"
say "done in $(( $(date +%s) - T0 )) s; next: docker-compose -p creditflow -f infra/compose/docker-compose.yml up -d --build"
