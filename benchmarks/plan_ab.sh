#!/usr/bin/env bash
# A/B of the plan kernels in one device call: builds benchmarks/cuda_bench_dispatch.cu once per
# variant NAME=FLAGS (FLAGS: extra nvcc flags, -D knobs or -I DIR for another copy of ffi/,
# searched before ffi/), all at once, then times every variant's plan (BENCH_OPS=plan) in turn,
# $PASSES times over, so that drift between passes shows as a spread (benchmarks/NOTES.md).
#   bash benchmarks/plan_ab.sh "now=" "tile4096=-DJR_PLAN_TILE=4096"
set -uo pipefail
PASSES=${PASSES:-2}
nvcc="nvcc -std=c++17 -O3 -arch=sm_90 --expt-relaxed-constexpr -fmad=false"
names=()
for v in "$@"; do
  name=${v%%=*}
  names+=("$name")
  # shellcheck disable=SC2086  # the flags split into words on purpose
  $nvcc ${v#*=} -Iffi benchmarks/cuda_bench_dispatch.cu -o "/tmp/plan_ab_$name" \
    > "/tmp/plan_ab_$name.build" 2>&1 &
done
wait
for name in "${names[@]}"; do
  [ -x "/tmp/plan_ab_$name" ] || { echo "build of $name failed:"; tail -20 "/tmp/plan_ab_$name.build"; }
done
for pass in $(seq "$PASSES"); do
  for name in "${names[@]}"; do
    [ -x "/tmp/plan_ab_$name" ] || continue
    BENCH_OPS=plan "/tmp/plan_ab_$name" | awk -v n="$name" -v p="$pass" \
      '/^ +[0-9]/ {printf "%-14s pass %d: %s\n", n, p, $0} /trace/ {print n, $0}'
  done
done
