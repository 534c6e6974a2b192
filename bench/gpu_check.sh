#!/usr/bin/env bash
# ONE command for a GPU machine: build, GPU tests (pytest + GoogleTest), compute-sanitizer on a
# small case of each kernel, then the decode benchmark. Logs and json go to $OUT (default ./out).
# Usage: bash bench/gpu_check.sh [quick|refine|qcodes|qcodes-quick]  (quick: fewer shapes in the benchmark; refine: the
#        two-stage tests, sanitizers, benchmark and Nsight Compute kernel times only; qcodes: the
#        same for the qcodes score; qcodes-quick: the qcodes test files' CUDA cases, the
#        sanitizers, ncu and the qcodes benchmarks only)
# Carry .deps (libgtest-dev .deb, see below) for the C++ tests:
#   mkdir -p .deps && (cd .deps && apt-get download libgtest-dev)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
summary=()
note() { summary+=("$1"); echo "== $1"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

t0=$(date +%s)
if python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  note "build: ok ($(( $(date +%s) - t0 )) s)"
else
  note "build: FAILED (see build.log)"; tail -40 "$OUT/build.log"; printf '%s\n' "${summary[@]}"; exit 1
fi

tests="tests"
# refine: a kernel iteration on the two-stage step (its tests, sanitizers, benchmark and ncu times)
[ "${1:-}" = "refine" ] && tests="tests/test_refine.py tests/test_kernels.py tests/test_sketch.py tests/test_cuda_graph.py"
# qcodes-quick: a kernel iteration on the qcodes step: the CUDA cases of its test files and
# test_kernels (the decode), the sanitizers, its ncu kernel times and the decode's ncu sections,
# and the qcodes (16- and 32-token blocks) and tight benchmarks
mode="${1:-}"
if [ "$mode" = "qcodes-quick" ]; then
  tests="tests/test_code_spreads.py tests/test_qcodes.py tests/test_code_pool.py tests/test_codes_behind.py tests/test_cuda_graph.py tests/test_kernels.py tests/test_refine.py -k cuda"
  set -- qcodes
fi
# qcodes: every test (GoogleTests included), sanitizers, the qcodes step's ncu kernel times and
# the 16-token-block benchmark below (no shape sweep)

# The GoogleTest binary compiles every CUDA kernel again through CMake (minutes): it is built in
# the background while the Python tests run, and tests/test_cpp.py runs after (its own configure
# and build are then no-ops). Without the gtest package the C++ tests are skipped.
gtest_build=""
if ls .deps/*.deb >/dev/null 2>&1; then
  for f in .deps/*.deb; do dpkg -x "$f" .deps/root; done
  export CMAKE_PREFIX_PATH="$PWD/.deps/root/usr:${CMAKE_PREFIX_PATH:-}"
  export AETHER_CMAKE_CUDA=ON
  if [ "$tests" = "tests" ] || [ "${GTEST:-0}" = "1" ]; then  # GTEST=1: also in qcodes-quick
    ( cmake -S . -B build/ctest -DAETHER_CUDA=ON -DCMAKE_BUILD_TYPE=Release && cmake --build build/ctest -j 8 ) \
      > "$OUT/gtest_build.log" 2>&1 &
    gtest_build=$!
  fi
fi

python3 -m pytest $tests -q -n 12 -p no:cacheprovider --deselect tests/test_cpp.py::test_googletest_kernels \
  > "$OUT/pytest.log" 2>&1
rc=$?
note "pytest (GPU): rc=$rc $(tail -1 "$OUT/pytest.log")"
[ $rc -ne 0 ] && { grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20; grep -E "^E " "$OUT/pytest.log" | head -20; }
if [ -n "$gtest_build" ]; then
  wait "$gtest_build"
  python3 -m pytest tests/test_cpp.py -q -p no:cacheprovider > "$OUT/pytest_cpp.log" 2>&1
  rc=$?
  note "pytest tests/test_cpp.py (GoogleTest via ctest): rc=$rc $(tail -1 "$OUT/pytest_cpp.log")"
  [ $rc -ne 0 ] && tail -30 "$OUT/gtest_build.log"
fi

if [ -x build/ctest/aether_tests ]; then
  build/ctest/aether_tests --gtest_filter='Cuda*' > "$OUT/gtest_cuda.log" 2>&1
  note "GoogleTest Cuda*: rc=$? $(grep -E '^\[  (PASSED|FAILED)|SKIPPED \]' "$OUT/gtest_cuda.log" | tr '\n' ' ')"
fi

for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 python3 bench/sanitize_case.py > "$OUT/sanitizer_$tool.log" 2>&1
  note "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
done

shapes="1x16384,1x32768,1x131072,8x32768,32x16384"
[ "${1:-}" = "quick" ] && shapes="1x32768,8x32768"
if [ "${1:-}" != "refine" ] && [ "${1:-}" != "qcodes" ]; then
  python3 bench/bench_decode.py --iters 30 --shapes "$shapes" --out "$OUT/bench_decode.json" > "$OUT/bench.log" 2>&1
  note "benchmark: rc=$?"
fi
if [ "${1:-}" = "refine" ]; then
  ncu --clock-control none --launch-skip 60 --launch-count 14 --metrics gpu__time_duration.sum \
    python3 bench/profile_refine.py 0.5 0.095 > "$OUT/ncu_refine.log" 2>&1
  note "ncu (two-stage step): rc=$? $(grep -E '^  [a-z].*\(|gpu__time' "$OUT/ncu_refine.log" | sed -E 's/^ +void (aether::)?//; s/[<(].*//; s/ +gpu__time_duration.sum +us +/ /' | paste -sd' ' | sed 's/  */ /g')"
  # the first stage's score kernel (not in the window above): three launches
  ncu --clock-control none --kernel-name regex:sketch_score --launch-skip 10 --launch-count 3 \
    --metrics gpu__time_duration.sum,smsp__inst_executed.sum python3 bench/profile_refine.py 0.5 0.095 > "$OUT/ncu_sketch.log" 2>&1
  note "ncu (sketch_score x3): rc=$? $(grep -E 'gpu__time|inst_executed' "$OUT/ncu_sketch.log" | awk '{print $NF}' | paste -sd' ')"
elif [ "${1:-}" = "qcodes" ]; then
  ncu --clock-control none --kernel-name regex:"code_spreads|channel_scores|select|key_codes" --launch-skip 5 \
    --launch-count 4 --metrics gpu__time_duration.sum,smsp__inst_executed.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
    python3 bench/profile_step.py 8 32768 16 qcodes > "$OUT/ncu_qcodes.log" 2>&1
  note "ncu (qcodes step kernels): rc=$? $(grep -E '^  [a-z].*\(|gpu__time' "$OUT/ncu_qcodes.log" | sed -E 's/^ +void (aether::)?//; s/[<(].*//; s/ +gpu__time_duration.sum +us +/ /' | paste -sd' ' | sed 's/  */ /g')"
elif [ "${1:-}" != "quick" ]; then  # 32-token blocks, qsketch with 64-token sketch blocks (docs/selection.md) at 8 x 32k
  python3 bench/bench_decode.py --iters 30 --shapes 8x32768 --budgets 0.125 --block-size 32 --blocks-per-sketch 2 \
    --out "$OUT/bench_decode_bs32.json" > "$OUT/bench_bs32.log" 2>&1
  note "benchmark (32-token blocks): rc=$?"
  python3 bench/bench_decode.py --iters 30 --shapes 8x32768 --budgets 0.125 --block-size 16 --blocks-per-sketch 4 \
    --out "$OUT/bench_decode_bs16.json" > "$OUT/bench_bs16.log" 2>&1
  note "benchmark (16-token blocks, qsketch 4 per sketch block): rc=$?"
fi
# qcodes (an eighth of the channels' 4-bit codes over every block, keep 0.135: 15.9% of the bytes;
# the recommended setting, docs/selection.md; v12 measured a quarter of the channels at 2 bits)
# and two-stage selection (50% candidates ranked by 2-bit key codes, keep 0.095: 15.8%) at their
# measured quality points, 16-token blocks, 128-token sketch blocks; one-stage qsketch in the same run.
# The qcodes mode measures qcodes and the default tight step at batch 8 and 1 (the channel pool's
# step equals qcodes' own: same bytes, docs/benchmarks.md v15; `--code-pool 0.5` measures it).
if [ "${1:-}" = "qcodes" ]; then  # qcodes (16-token blocks) and the default tight step (64) at batch 8 and 1
  python3 bench/bench_decode.py --iters 30 --shapes 8x32768,1x32768 --budgets 0.135 --block-size 16 \
    --blocks-per-sketch 8 --scores qcodes,qsketch --code-channels 0.125 --code-bits 4 \
    --out "$OUT/bench_decode_qcodes.json" > "$OUT/bench_refine.log" 2>&1
  note "benchmark (qcodes, 16-token blocks): rc=$?"
  if [ "$mode" = "qcodes-quick" ]; then
    # the channel choice as its own launch, same run: `--code-choice launch` (docs/benchmarks.md v17)
    # where the decode's time goes (the largest stage): one launch of the split-KV kernel
    ncu --clock-control none --kernel-name regex:"sparse_decode_kernel" --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats \
      python3 bench/profile_step.py 8 32768 16 qcodes > "$OUT/ncu_decode.log" 2>&1
    note "ncu (sparse_decode): rc=$? $(grep -E '^ +(Duration|DRAM Throughput|Warp Cycles Per Issued)' "$OUT/ncu_decode.log" | awk '{print $1, $(NF)}' | paste -sd' ')"
    # the append beside the decode (codes one token behind, update_codes=True, codes_stream), same run
    python3 bench/bench_decode.py --iters 30 --shapes 8x32768,1x32768,32x16384 --budgets 0.135 --block-size 16 \
      --scores qcodes,qcodes+behind --code-channels 0.125 --code-bits 4 \
      --out "$OUT/bench_decode_qcodes_behind.json" > "$OUT/bench_behind.log" 2>&1
    note "benchmark (qcodes and qcodes+behind): rc=$?"
    # the one-CTA select's time per phase (standalone builds with its phase clocks, ~10 s each):
    # the library's build and the v24 kernel (8 staging loads in flight per lane)
    : > "$OUT/select_phases.log"
    for variant in "" "-DAETHER_SELECT_STAGE_BATCH=8"; do
      nvcc -std=c++17 -arch=sm_90a -O3 -lineinfo --expt-relaxed-constexpr -DAETHER_SELECT_PHASE_CLOCKS $variant \
        -Icsrc/include bench/select_phases.cu -o "$OUT/select_phases.bin" >> "$OUT/select_phases.log" 2>&1 || continue
      for shape in "8 32768" "32 16384" "8 65536"; do "$OUT/select_phases.bin" $shape >> "$OUT/select_phases.log" 2>&1; done
      note "select phases ${variant:-(library)}: $(grep -E '^select_phases|start ->' "$OUT/select_phases.log" | tail -6 | sed -E 's/.*select_phases: ([0-9]+ x [0-9]+).*kernel ([0-9.]+) us.*/\1 kernel \2/; s/ +start -> end +[0-9]+ +100.0% +/ in-kernel /' | paste -sd' ')"
    done
    rm -f "$OUT/select_phases.bin"
    # which kernels overlap in one graph replay of each (the append beside the decode, v24)
    python3 bench/trace_step.py 8 32768 16 0.135 > "$OUT/trace_step.log" 2>&1
    note "trace (qcodes, qcodes+behind): rc=$? spans $(grep -E 'span' "$OUT/trace_step.log" | awk '{print $2}' | paste -sd' ') us"
    # qcodes at 32-token blocks (the quality goal on two texts at the same bytes; half the blocks to rank)
    python3 bench/bench_decode.py --iters 30 --shapes 8x32768,1x32768 --budgets 0.135 --block-size 32 \
      --scores qcodes --code-channels 0.125 --code-bits 4 \
      --out "$OUT/bench_decode_qcodes_bs32.json" > "$OUT/bench_bs32_qcodes.log" 2>&1
    note "benchmark (qcodes, 32-token blocks): rc=$?"
  fi
  python3 bench/bench_decode.py --iters 30 --shapes 8x32768,1x32768 --budgets 0.125 --scores tight \
      --out "$OUT/bench_decode_tight.json" > "$OUT/bench_tight.log" 2>&1
  note "benchmark (tight, 64-token blocks): rc=$?"
else
  python3 bench/bench_decode.py --iters 30 --shapes 8x32768 --budgets 0.095,0.135 --block-size 16 --blocks-per-sketch 8 \
    --scores qcodes,qsketch,qsketch+refine+reuse --refine 0.5:2 --code-channels 0.125 --code-bits 4 \
    --out "$OUT/bench_decode_refine.json" > "$OUT/bench_refine.log" 2>&1
  note "benchmark (qcodes and two-stage refine, 16-token blocks): rc=$?"
fi
echo
printf '%s\n' "${summary[@]}"
[ -f "$OUT/bench.log" ] && sed -n '/copy .* GB\/s/,$p' "$OUT/bench.log"
[ -f "$OUT/bench_bs32.log" ] && grep -E "^ +8x32768" "$OUT/bench_bs32.log"
[ -f "$OUT/bench_bs16.log" ] && grep -E "^ +8x32768" "$OUT/bench_bs16.log"
grep -E "^ +[18]x32768|qcodes .*: channels" "$OUT/bench_refine.log"
for f in bench_tight bench_launch bench_ch3_16 bench_bs32_qcodes bench_behind; do
  [ -f "$OUT/$f.log" ] && { echo "-- $f"; grep -E "^ +[18]x32768|^ +32x16384|qcodes .*: channels" "$OUT/$f.log"; }
done
[ -f "$OUT/bench.log" ] && tail -5 "$OUT/bench.log" | grep -i error
