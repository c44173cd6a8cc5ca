#!/usr/bin/env bash
# The test command of the README and of .ci/run:  sh infra/ensure_system.sh && bash infra/run_tests.sh
#
# 1. builds the separate vLLM environment (.venv-vllm, infra/test_vllm.sh --install) in the background:
#    it is mostly downloading and unpacking wheels (~5-7 min), so it runs beside step 2;
# 2. builds the main environment .venv with the test extra;
# 3. waits for step 1 and runs the vLLM tests in .venv-vllm (infra/test_vllm.sh --test);
# 4. runs the default suite (everything not marked slow) in .venv, last, so the final line is its summary.
# Exit status: non-zero if either suite failed. Extra arguments go to the main pytest run.
set -uo pipefail
cd "$(dirname "$0")/.."
vlog=$(mktemp --suffix=-vllm-install.log)
CREDITFLOW_VLLM_LOG="$vlog.pip" bash infra/test_vllm.sh --install >"$vlog" 2>&1 &
vpid=$!
trap 'kill $vpid 2>/dev/null' INT TERM
python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'
main_env=$?
wait $vpid
echo "== vLLM environment"; cat "$vlog"
rc=0
CREDITFLOW_VLLM_LOG="$vlog.pip" bash infra/test_vllm.sh --test || rc=$?
[ "$main_env" = 0 ] || { echo "main environment: pip install -e '.[test]' failed"; exit 1; }
.venv/bin/python -m pytest -q -m "not slow" "$@" || rc=$?
exit $rc
