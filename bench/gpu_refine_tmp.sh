set -uo pipefail
export CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH MAX_JOBS=16 PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
for f in .deps/*.deb; do dpkg -x $f .deps/root; done; export CMAKE_PREFIX_PATH=$PWD/.deps/root/usr AETHER_CMAKE_CUDA=ON
python3 -m pytest tests/test_refine.py tests/test_sketch.py tests/test_cpp.py -q -n 8 -p no:cacheprovider 2>&1 | tail -3
build/ctest/aether_tests --gtest_filter='Cuda*KeyCodes*:CudaRefine*:CudaSketch*' 2>&1 | grep -E '^\[  (PASSED|FAILED)|FAILED'
compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_case.py 2>&1 | grep -E "ERROR SUMMARY" | tail -1
python3 bench/bench_decode.py --iters 30 --shapes 8x32768 --budgets 0.112,0.135 --block-size 16 --blocks-per-sketch 8 --scores qsketch,qsketch+refine --refine 0.3:2 --out $OUT/bench_decode_refine.json > $OUT/bench_refine.log 2>&1; grep -E "^ +8x32768|Error|error" $OUT/bench_refine.log
python3 - <<'P'
import json,os
d=json.load(open(os.environ['OUT']+'/bench_decode_refine.json'))
for r in d['rows'][0]['budgets']: print(r['score'], r['fraction'], {k:round(v*1e3,1) for k,v in r.items() if k.endswith('_ms')})
P
ncu --clock-control none --launch-skip 60 --launch-count 10 --metrics gpu__time_duration.sum python3 bench/profile_refine.py 2>&1 | grep -E "^  [a-zA-Z].*\(|gpu__time_duration" | cut -c1-90
