#!/usr/bin/env bash
# The real verl 0.9.1 in a separate environment (.venv-verl, gitignored), to check our estimators against
# verl's own functions (tests/test_verl_parity.py) and time them (benchmarks/credit_kernels.py).
#
#   bash infra/verl_env.sh        # build or complete .venv-verl (idempotent), then check the import
#
# verl's wheel requires its whole training stack (vllm/sglang-free, but datasets, peft, wandb, ray[default],
# tensorboard, ...). Only `verl.trainer.ppo.core_algos` is needed, so verl goes in with --no-deps beside
# the few packages that module's import chain needs (list below: what `import verl.trainer.ppo.core_algos`
# loads, checked with sys.modules; the version caps
# are verl's own Requires-Dist). The project itself is not installed: the tests and the benchmark put the
# repository root on sys.path. Exit status 0 and one line either way: "verl env ready ..." or
# "verl env NOT built: <reason>" (the parity tests then skip with that reason).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${CREDITFLOW_VERL_VENV:-.venv-verl}
PY=${PYTHON:-python3}
start=$(date +%s)
log=$(mktemp --suffix=-verl-env.log)
REQS=(
  "torch==2.13.0"
  "verl==0.9.1"
)
DEPS=(
  "numpy>=2.0.0"
  "tensordict>=0.8.0,<=0.10.0,!=0.9.0"
  "transformers>=5.5.3,<5.11,!=5.6.0"
  "ray>=2.41.0"
  "codetiming"
  "omegaconf"
  "packaging>=20.0"
)
fail() {
  echo "verl env NOT built: $1 (log: $log)"; tail -n 8 "$log" | sed 's/^/    /'
  rm -f "$VENV/.creditflow-verl-ready"
  exit 0
}
if [ -f "$VENV/.creditflow-verl-ready" ] && "$VENV/bin/python" -c "import verl.trainer.ppo.core_algos" >>"$log" 2>&1; then
  echo "verl env ready (already built): $VENV/bin/python, $("$VENV/bin/python" -c 'import verl, torch; print("verl", verl.__version__, "torch", torch.__version__)' 2>/dev/null)"
  exit 0
fi
rm -f "$VENV/.creditflow-verl-ready"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" >>"$log" 2>&1 || fail "could not create the virtual environment $VENV"
"$VENV/bin/pip" install -q "${REQS[0]}" >>"$log" 2>&1 || fail "pip install ${REQS[0]} failed"
"$VENV/bin/pip" install -q --no-deps "${REQS[1]}" >>"$log" 2>&1 || fail "pip install --no-deps ${REQS[1]} failed"
# verl's wheel also ships its own test suite as a top-level package `tests`, which would shadow this
# repository's tests/ (a namespace package) on import: remove it
"$VENV/bin/python" - <<'PY' >>"$log" 2>&1 || fail "could not remove verl's top-level tests package"
import pathlib, shutil, sysconfig
p = pathlib.Path(sysconfig.get_paths()["purelib"]) / "tests"
if (p / "test_protocol_on_cpu.py").exists():
    shutil.rmtree(p)
PY
"$VENV/bin/pip" install -q "${DEPS[@]}" >>"$log" 2>&1 || fail "pip install ${DEPS[*]} failed"
"$VENV/bin/python" -c "import verl.trainer.ppo.core_algos" >>"$log" 2>&1 || fail "verl.trainer.ppo.core_algos does not import in $VENV"
touch "$VENV/.creditflow-verl-ready"
echo "verl env ready in $(( $(date +%s) - start )) s: $VENV/bin/python, $("$VENV/bin/python" -c 'import verl, torch; print("verl", verl.__version__, "torch", torch.__version__)' 2>/dev/null)"
