#!/usr/bin/env bash
# Runs pytest over test files split into N shards that run at once (one process each), so a GPU call spends
# its minutes compiling Triton kernels on every core instead of one: each shard's log is $RUN/shard-K.log
# (or ./shard-K.log), and the exit status is the worst shard's.
#
#   bash tools/pytest_shards.sh 4 -m gpu -- tests/kernels tests/model
set -u
n=$1
shift
args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
shift
files=$(find "$@" -name 'test_*.py' | sort)
dir=${RUN:-.}
pids=()
for k in $(seq 0 $((n - 1))); do
  mine=$(echo "$files" | awk -v n="$n" -v k="$k" 'NR % n == k')
  [ -z "$mine" ] && continue
  # shellcheck disable=SC2086
  "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider -rf "${args[@]}" $mine >"$dir/shard-$k.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid"
  r=$?
  # pytest's 5 is "no tests collected" (a shard of CPU-only files): not a failure
  if [ "$r" -ne 0 ] && [ "$r" -ne 5 ] && [ "$r" -gt "$rc" ]; then rc=$r; fi
done
for k in $(seq 0 $((n - 1))); do [ -f "$dir/shard-$k.log" ] && { echo "== shard $k"; tail -n 4 "$dir/shard-$k.log"; }; done
exit "$rc"
