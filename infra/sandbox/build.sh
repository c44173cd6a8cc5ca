#!/bin/sh
# Build the docker sandbox image offline from this host (no registry needed); idempotent.
# Usage: infra/sandbox/build.sh [--tag T] [--force] [--python PATH]
cd "$(dirname "$0")/../.." || exit 1
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" -m environments.sandbox.image "$@"
