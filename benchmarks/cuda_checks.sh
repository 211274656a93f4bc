#!/usr/bin/env bash
# The checks of the CUDA backend that need a GPU, for a machine with nvcc and a CUDA build of
# torch. Logs go to OUT_DIR; the stages print short summaries.
#
#   bash benchmarks/cuda_checks.sh build OUT_DIR   build hgloss._C in place, with the CUDA kernels
#   bash benchmarks/cuda_checks.sh smoke OUT_DIR   a few GPU tests, to stop early on a broken kernel
#   bash benchmarks/cuda_checks.sh test  OUT_DIR   every GPU test alongside compute-sanitizer
#                                                  (memcheck and racecheck)
#   bash benchmarks/cuda_checks.sh bench OUT_DIR [bench_loss.py arguments]
#                                                  the loss benchmark, the backward comparison and
#                                                  the keypoint-targets benchmark
#
# PYTHON (default python3) runs everything; TORCH_CUDA_ARCH_LIST (default: the GPU's own) picks
# the architectures to build for; TEST_WORKERS (default 6) the pytest-xdist workers;
# BENCH_SECONDS interrupts the loss benchmark after that long, which then writes what it measured.
set -uo pipefail
stage=${1:?usage: cuda_checks.sh test|bench OUT_DIR [arguments]}
out=${2:?usage: cuda_checks.sh test|bench OUT_DIR [arguments]}
shift 2
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# hgloss is built in place, not installed: scripts under tests/ and benchmarks/ import it from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

build() {
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1
  {
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, torch.cuda.get_device_name())"
    nvcc --version | tail -n 2
  } | tee "$out/versions.txt"
  local started=$SECONDS
  if ! MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace > "$out/build.log" 2>&1; then
    tail -n 40 "$out/build.log"
    echo "BUILD FAILED"
    exit 1
  fi
  echo "build: $((SECONDS - started)) s"
  "$PY" -c "from hgloss.backends import _build; import hgloss; print('backends:', hgloss.available_backends(), \
'| CUDA kernels registered at import:', _build.cuda_kernels_registered())"
}

smoke() {
  local started=$SECONDS
  if ! "$PY" -m pytest -x -q -p no:cacheprovider tests/test_cuda.py \
      -k "layout or degenerate_planes and 64x64 or graph" > "$out/smoke.log" 2>&1; then
    tail -n 60 "$out/smoke.log"
    echo "SMOKE TEST FAILED"
    exit 1
  fi
  echo "smoke: $(tail -n 1 "$out/smoke.log"), $((SECONDS - started)) s"
}

run_tests() {
  local started=$SECONDS
  "$PY" -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-6}" -k cuda \
    tests/test_cuda.py tests/test_fused_vs_reference.py tests/test_fused_ops.py tests/test_keypoint_loss.py \
    tests/test_fused_pixel_weight.py \
    > "$out/pytest.log" 2>&1 &
  local tests=$!
  compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 \
    "$PY" tests/cuda_sanitizer_cases.py > "$out/memcheck.log" 2>&1 &
  local memcheck=$!
  compute-sanitizer --tool racecheck --error-exitcode 3 \
    "$PY" tests/cuda_sanitizer_cases.py > "$out/racecheck.log" 2>&1 &
  local racecheck=$!
  wait $memcheck; echo "memcheck exit $?: $(grep -E 'ERROR SUMMARY|cases' "$out/memcheck.log" | tr '\n' ' ')"
  wait $racecheck; echo "racecheck exit $?: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|cases' "$out/racecheck.log" | tr '\n' ' ')"
  wait $tests; echo "pytest exit $?: $(tail -n 1 "$out/pytest.log")"
  grep -E "^(FAILED|ERROR)" "$out/pytest.log" | head -n 20
  echo "tests and sanitizers: $((SECONDS - started)) s"
}

case "$stage" in
  build) build ;;
  smoke) smoke ;;
  test) run_tests ;;
  bench)
    timeout -s INT "${BENCH_SECONDS:-0}" "$PY" benchmarks/bench_loss.py --device cuda --out "$out" "$@" \
      > "$out/bench.log" 2>&1
    tail -n 30 "$out/bench.log"
    "$PY" benchmarks/bench_backward.py --device cuda --batch 64,1024 | tee "$out/backward.md"
    "$PY" benchmarks/bench_keypoint_targets.py --device cuda --backend cuda --out "$out/keypoint_targets" \
      > "$out/keypoint_targets.log" 2>&1
    tail -n 30 "$out/keypoint_targets.log"
    ;;
  *)
    echo "unknown stage $stage: expected build, smoke, test or bench"
    exit 2
    ;;
esac
