#!/usr/bin/env bash
# One device-machine session: build the extension for the H200, then the steps named in
# $STEPS (default: all), each logged to $OUT/<step>.log. Used for the runs in RESULTS.md.
#   STEPS="build qb cross sanitize benchqb" bash benchmarks/gpu_run.sh
set -uo pipefail
OUT=${OUT:-/tmp/jr_out}; mkdir -p "$OUT"
STEPS=${STEPS:-build suite cross sanitize benchqb benchdispatch bench}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
py=python3
# the kernel-level benchmarks, built as the extension builds its CUDA code
nvcc="nvcc -std=c++17 -O3 -arch=sm_90 --expt-relaxed-constexpr -fmad=false -Iffi"
for step in $STEPS; do
  start=$(date +%s)
  case $step in
    build) $py -m pip install -q --no-build-isolation --no-deps -e . \
             -Ccmake.define.JAX_ROUTER_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
             -Ccmake.define.JAX_ROUTER_XLA_INCLUDE_DIR="$($py -c 'import jax.ffi; print(jax.ffi.include_dir())')" ;;
    suite) $py -m pytest -q -p no:cacheprovider -n 12 --require-gpu tests ;;
    qb) $py -m pytest -q -p no:cacheprovider -n 8 --require-gpu tests/test_qb.py ;;
    dispatch) $py -m pytest -q -p no:cacheprovider -n 8 --require-gpu tests/test_dispatch*.py ;;
    cross) $py -m pytest -q -p no:cacheprovider -n 8 --require-gpu tests/test_cross_platform.py ;;
    sanitize) for tool in memcheck racecheck; do
                compute-sanitizer --tool $tool --kernel-name kns=jax_router $py benchmarks/sanitize_gpu.py | tail -4
              done ;;
    benchqb) $py benchmarks/bench_qb.py ;;
    benchdispatch) $py benchmarks/bench_dispatch.py --out "$OUT" --plot ;;
    kerneldispatch) $nvcc benchmarks/cuda_bench_dispatch.cu -o /tmp/cuda_bench_dispatch && /tmp/cuda_bench_dispatch ;;
    kernelrouter) $nvcc benchmarks/cuda_bench.cu -o /tmp/cuda_bench && /tmp/cuda_bench ;;
    ep) $py examples/moe_ep.py --devices 2 ;;
    ep_padded) $py examples/moe_ep.py --devices 2 --exchange padded ;;
    installdiag) PYTHONFAULTHANDLER=1 $py -m pytest -q -p no:cacheprovider tests/test_install.py -k newer_than ;;
    profile) ncu --kernel-name regex:'dispatch|qb_histogram|plan_|permute' --launch-count 8 --section SpeedOfLight $py benchmarks/profile_once.py | grep -E '^  [a-z_].*\(|Duration|Compute \(SM\)|Memory Throughput' ;;
    sharding) $py -m pytest -q -p no:cacheprovider -n 4 --require-gpu tests/test_sharding.py tests/test_dispatch_sharding.py tests/test_qb.py -k "shard or Shard" ;;
    bench) $py benchmarks/bench_gpu.py --configs ${BENCH_CONFIGS:-large,kimi-k2,deepseek-v3} --tokens 65536 --modes compact ;;
    # the kernel-speed issue's tables: every config, bf16 and f32, compact / dense / backward,
    # kernel time from 1024 to 262144 tokens, then the through-JAX table and plot
    kernelsizes) $nvcc benchmarks/cuda_bench.cu -o /tmp/cuda_bench && BENCH_T=1024,4096,16384,65536,262144 /tmp/cuda_bench ;;
    benchall) $py benchmarks/bench_gpu.py --configs deepseek-v3,qwen3,mixtral,kimi-k2,qwen3-next,large --tokens 16384,65536 --dtypes bf16,f32 --modes compact,dense --out "$OUT" --max-minutes 8 ;;
    *) $py $step ;;  # any other step: a script path
  esac > "$OUT/$step.log" 2>&1
  rc=$?
  echo "== $step rc=$rc $(( $(date +%s) - start ))s: $(tail -n 2 "$OUT/$step.log" | tr '\n' ' ' | cut -c1-300)"
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log --oneline -1
