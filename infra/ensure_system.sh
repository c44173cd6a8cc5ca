#!/bin/sh
# System tools the test suite uses, installed when missing (first step of the README test command):
#   * a Docker engine (infra/ensure_docker.sh): docker sandbox backend, its fault matrix, the pipeline in Docker;
#   * bubblewrap (`bwrap`): namespace isolation of the process sandbox backend (sandbox.isolation=auto|bwrap);
#   * Debian chromium + chromium-driver: the headless-browser test of the Prefect and MLflow UIs
#     (tests/test_browser.py; ~121 MB download);
#   * a Java runtime (>= 11): TextWorld Express runs its games in a JVM (env=textgame, tests/test_textgame.py).
# Needs root and apt-get to install; otherwise (or when a mirror is unreachable) it says what is missing
# and exits 0: the tests that need the tool then skip and name it.
here=$(dirname "$0")
sh "$here/ensure_docker.sh"

missing=""
command -v bwrap >/dev/null 2>&1 || missing="$missing bubblewrap"
{ command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
command -v java >/dev/null 2>&1 || missing="$missing default-jre-headless"
if [ -z "$missing" ]; then
    echo "ensure_system: bwrap, chromium, chromedriver and java present"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_system: missing:$missing (not root with apt-get: not installed; the tests that need them skip)"
    exit 0
fi
echo "ensure_system: installing$missing ..."
start=$(date +%s)
if DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 &&
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1; then
    echo "ensure_system: installed$missing in $(( $(date +%s) - start )) s"
else
    echo "ensure_system: apt-get install$missing failed (no package mirror reachable?); the tests that need them skip"
fi
exit 0
