#!/usr/bin/env bash
# One call on a lent GPU machine (offline, Python 3.12, torch/triton/cupy already there): install the wheels
# carried in .whl/ (../shared/tools/gpu-wheels.sh .whl all) and this tree, then run each STEP with its own time
# limit. Every step's log and every result file a step writes (bench/results, $RUN) land in $OUT/run.tgz; a
# summary (step, exit code, seconds, last lines) is printed last and kept in $OUT/summary.txt.
#
#   tools/gpu_session.sh 'gpu_tests:300=python3 -m pytest tests -m gpu -q -x' 'mesh:240=python3 -m bench.bench_mesh --device cuda'
#
# STEP is NAME:SECONDS=COMMAND. Set MOEMESH_COMMIT (the copy has no .git).
set -u
export PYTHONUNBUFFERED=1 MOEMESH_COMMIT=${MOEMESH_COMMIT:-unknown}
OUT=${OUT:-/tmp/out}
RUN=/tmp/run
mkdir -p "$RUN" "$OUT"
export RUN
started=$(date +%s)
{
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site &&
    { python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . ||
      python3 -m pip install -q --no-deps --no-index -e .; }
} >"$RUN/install.log" 2>&1 || { echo "install failed"; tail -20 "$RUN/install.log"; cp "$RUN/install.log" "$OUT/"; exit 1; }
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$RUN/gpu.txt" 2>&1
touch "$RUN/.t0"
for step in "$@"; do
  head=${step%%=*}
  cmd=${step#*=}
  name=${head%%:*}
  limit=${head#*:}
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" >"$RUN/$name.log" 2>&1
  rc=$?
  printf '%-16s rc=%-4s %5ss\n' "$name" "$rc" "$(($(date +%s) - t0))" >>"$RUN/summary.txt"
  # after every step, so a call cut short by its time limit still brings back what ran
  find bench/results -newer "$RUN/.t0" -type f -exec cp {} "$RUN/" \; 2>/dev/null
  tar czf "$OUT/run.tgz" -C "$RUN" . 2>/dev/null
done
find bench/results -newer "$RUN/.t0" -type f -exec cp {} "$RUN/" \; 2>/dev/null
tar czf "$OUT/run.tgz" -C "$RUN" . 2>/dev/null
cp "$RUN/summary.txt" "$OUT/summary.txt"
echo "== total $(($(date +%s) - started)) s"
for step in "$@"; do
  head=${step%%=*}
  name=${head%%:*}
  echo "== $name: $(grep "^$name " "$RUN/summary.txt")"
  tail -n 12 "$RUN/$name.log"
done
