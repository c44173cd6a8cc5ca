#!/usr/bin/env bash
# The test command of the README and of .ci/run:  sh infra/ensure_system.sh && bash infra/run_tests.sh
#
# 1. builds the separate vLLM environment (.venv-vllm) and runs the vLLM tests there
#    (bash infra/test_vllm.sh: ~5-7 min of downloads and unpacking, then ~2 min of tests) in the
#    background, beside steps 2 and 3; its output is printed when both are done;
# 2. builds the main environment .venv with the test extra;
# 3. runs the default suite (everything not marked slow) in .venv; its summary line is printed
#    again last, after the vLLM report.
# Exit status: non-zero if either suite failed. Extra arguments go to the main pytest run.
set -uo pipefail
cd "$(dirname "$0")/.."
vlog=$(mktemp --suffix=-vllm.log)
mlog=$(mktemp --suffix=-pytest.log)
CREDITFLOW_VLLM_LOG="$vlog.pip" bash infra/test_vllm.sh >"$vlog" 2>&1 &
vpid=$!
trap 'kill $vpid 2>/dev/null' INT TERM
python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'
main_env=$?
rc=0
if [ "$main_env" = 0 ]; then
  .venv/bin/python -m pytest -q -m "not slow" "$@" 2>&1 | tee "$mlog"
  rc=${PIPESTATUS[0]}
fi
vrc=0
wait $vpid || vrc=$?
echo "== vLLM environment and tests (bash infra/test_vllm.sh, run beside the main suite)"; cat "$vlog"
[ "$vrc" = 0 ] || rc=$vrc
[ "$main_env" = 0 ] || { echo "main environment: pip install -e '.[test]' failed"; exit 1; }
echo "== default suite"; tail -n 1 "$mlog"
exit $rc
