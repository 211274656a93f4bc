#!/usr/bin/env bash
# Whether a wider vector ISA pays off for the CPU kernel: builds hgloss._C of the committed HEAD
# once per -march (HGLOSS_CPU_ARCH) in throwaway worktrees, then times the fused CPU backend and
# torch.compile with benchmarks/bench_loss.py, alternating between the builds ROUNDS times so
# that drift on a shared machine hits them alike. Each round's summary.md goes to
# OUT_DIR/<arch>-<round>/, and the medians of every round are tabulated in OUT_DIR/summary.md.
#
#   bash benchmarks/compare_cpu_arch.sh OUT_DIR [ARCH ...] [-- bench_loss.py arguments]
#
# ARCHs default to "x86-64 x86-64-v3" (the wheel's baseline, and AVX2+FMA); the bench arguments
# default to "--providers cpu,compile --batch 64,128 --repeats 40". PYTHON (default: the venv's
# python) must have torch and the build requirements.
set -euo pipefail
out=${1:?usage: compare_cpu_arch.sh OUT_DIR [ARCH ...] [-- bench_loss.py arguments]}
shift
arches=()
while [[ $# -gt 0 && $1 != "--" ]]; do arches+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
bench_args=("$@")
[[ ${#arches[@]} -eq 0 ]] && arches=(x86-64 x86-64-v3)
[[ ${#bench_args[@]} -eq 0 ]] && bench_args=(--providers cpu,compile --batch 64,128 --repeats 40)
rounds=${ROUNDS:-3}

repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$repo/.venv/bin/python}
mkdir -p "$out"
out=$(cd "$out" && pwd)
scratch=$(mktemp -d)
cleanup() {
  for arch in "${arches[@]}"; do git -C "$repo" worktree remove --force "$scratch/$arch" 2>/dev/null || true; done
  rm -rf "$scratch"
}
trap cleanup EXIT

for arch in "${arches[@]}"; do
  echo "building hgloss._C with -march=$arch" >&2
  git -C "$repo" worktree add --quiet --detach "$scratch/$arch" HEAD
  (cd "$scratch/$arch" && HGLOSS_DISABLE_CUDA=1 HGLOSS_CPU_ARCH=$arch "$PY" setup.py build_ext --inplace \
    > "$out/build-$arch.log" 2>&1)
done

for round in $(seq 1 "$rounds"); do
  for arch in "${arches[@]}"; do
    echo "round $round, -march=$arch" >&2
    # Run from the worktree, so that its hgloss (and its _C) is the one imported.
    (cd "$scratch/$arch" && "$PY" benchmarks/bench_loss.py "${bench_args[@]}" --out "$out/$arch-$round" > /dev/null)
  done
done

{
  echo "# The CPU kernel built for each -march, timed alternately"
  echo
  echo "Commit $(git -C "$repo" rev-parse --short HEAD), $(date -u '+%Y-%m-%d %H:%M UTC'), with:"
  echo
  echo "    bash benchmarks/compare_cpu_arch.sh OUT_DIR ${arches[*]} -- ${bench_args[*]}"
  echo
  echo "Each row is one round's bench_loss.py result (median ms of the fused CPU backend and of"
  echo "torch.compile, measured side by side in that run); the rounds alternate between the builds."
  echo
  echo "| -march | round | threads | batch | cpu ms | compile ms | cpu vs compile |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  for arch in "${arches[@]}"; do
    for round in $(seq 1 "$rounds"); do
      "$PY" "$repo/benchmarks/compare_cpu_arch_rows.py" "$out/$arch-$round/bench_loss.csv" "$arch" "$round"
    done
  done
} > "$out/summary.md"
cat "$out/summary.md"
