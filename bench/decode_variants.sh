#!/usr/bin/env bash
# sparse_decode's copy variants in one GPU call: builds each (the compile-time switches at the top
# of csrc/include/aether/cuda/sparse_decode.cuh, rewritten in place and restored at the end; only
# the decode's translation units rebuild), times its kernel with Nsight Compute in the qcodes step
# (8 x 32k, 16-token blocks, keep 0.135) and the step with bench_decode.py against SDPA, and
# prints one table. The first variant is the default build; the CUDA decode tests and the
# sanitizers run on it first.
# Usage (GPU machine): OUT=dir bash bench/decode_variants.sh [name:bulk:ahead ...]
#   default variants: bulk:1:1 (bulk copies, block index read one iteration ahead),
#   noahead:1:0, cpasync:0:1 (16-byte cp.async into the same padded rows)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
header=csrc/include/aether/cuda/sparse_decode.cuh
cp "$header" /tmp/sparse_decode.cuh.orig
trap 'cp /tmp/sparse_decode.cuh.orig "$header"' EXIT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(bulk:1:1 noahead:1:0 cpasync:0:1)
table=()
first=1
for v in "${variants[@]}"; do
  IFS=: read -r name bulk ahead <<< "$v"
  cp /tmp/sparse_decode.cuh.orig "$header"
  sed -i -E "s/^#define AETHER_DECODE_BULK [01]/#define AETHER_DECODE_BULK $bulk/; s/^#define AETHER_DECODE_INDEX_AHEAD [01]/#define AETHER_DECODE_INDEX_AHEAD $ahead/" "$header"
  t0=$(date +%s)
  if ! python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/build_$name.log" 2>&1; then
    echo "== $name: build FAILED"; tail -30 "$OUT/build_$name.log"; continue
  fi
  echo "== $name: built in $(( $(date +%s) - t0 )) s"
  if [ $first -eq 1 ]; then
    first=0
    python3 -m pytest tests/test_kernels.py tests/test_qcodes.py tests/test_cuda_graph.py -k cuda -q -n 12 -p no:cacheprovider \
      > "$OUT/pytest_$name.log" 2>&1
    echo "== $name: pytest rc=$? $(tail -1 "$OUT/pytest_$name.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/pytest_$name.log" | head -10
    for tool in memcheck racecheck; do
      compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/sanitize_case.py > "$OUT/sanitizer_$tool.log" 2>&1
      echo "== $name: compute-sanitizer $tool rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
    done
  fi
  ncu --clock-control none --kernel-name regex:sparse_decode_kernel --launch-skip 3 --launch-count 3 \
    --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum \
    python3 bench/profile_step.py 8 32768 16 qcodes > "$OUT/ncu_$name.log" 2>&1
  ncu_line=$(grep -E "gpu__time_duration|dram__throughput|inst_executed" "$OUT/ncu_$name.log" | awk '{print $NF}' | paste -sd' ')
  echo "== $name: ncu sparse_decode (us, DRAM %, instructions) x3: $ncu_line"
  python3 bench/bench_decode.py --iters 30 --shapes 8x32768,1x32768 --budgets 0.135 --block-size 16 --scores qcodes \
    --code-channels 0.125 --code-bits 4 --out "$OUT/bench_qcodes_$name.json" > "$OUT/bench_$name.log" 2>&1
  echo "== $name: bench rc=$?"
  while read -r line; do table+=("$name  $line"); done < <(grep -E "^ +[0-9]+x[0-9]+ " "$OUT/bench_$name.log")
  table+=("$name  ncu: $ncu_line")
done
echo
printf '%s\n' "${table[@]}"
