#!/usr/bin/env bash
# Nsight Compute source view of the one-CTA select (bench/select_phases.cu's launch, 8 x 32k by
# default): stall samples and instructions per CUDA source line and per SASS instruction, to see
# which phase waits on what. Usage (GPU machine): OUT=dir bash bench/ncu_select_phases.sh [batch ctx]
# Writes select_phases_cuda.csv / select_phases_sass.csv and prints the hottest lines.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
bin=$(mktemp -d)/select_phases
nvcc -std=c++17 -arch=sm_90a -O3 -lineinfo --expt-relaxed-constexpr -DAETHER_SELECT_PHASE_CLOCKS -Icsrc/include \
  bench/select_phases.cu -o "$bin" || exit 1
# launch 10 of select_phases' 56 (5 warm-up, 50 timed, 1 with clocks)
ncu --clock-control none --kernel-name regex:radar_select_kernel --launch-skip 10 --launch-count 1 \
  --section SourceCounters --section WarpStateStats --section LaunchStats --import-source yes -f -o "$bin" \
  "$bin" ${1:-8} ${2:-32768} > "$OUT/ncu_select_phases_run.log" 2>&1
echo "ncu rc=$?"
ncu -i "$bin.ncu-rep" --page source --csv --print-source cuda > "$OUT/select_phases_cuda.csv" 2>&1
ncu -i "$bin.ncu-rep" --page source --csv --print-source sass > "$OUT/select_phases_sass.csv" 2>&1
python3 - "$OUT/select_phases_cuda.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
hi = next((i for i, r in enumerate(rows) if "Source" in r), None)
if hi is None:
    sys.exit(f"no header: {rows[:3]}")
hdr = rows[hi]
def col(name):
    return next((i for i, h in enumerate(hdr) if h.startswith(name)), None)
src, samp, inst = col("Source"), col("Warp Stall Sampling (All"), col("Instructions Executed")
line = col("#") if col("#") is not None else 0
data = []
for r in rows[hi + 1:]:
    try:
        data.append((float(r[samp] or 0), float(r[inst] or 0) if inst is not None else 0.0, r[line], r[src].strip()[:90]))
    except (ValueError, IndexError, TypeError):
        pass
total = sum(d[0] for d in data) or 1.0
print(f"stall samples {total:.0f}; hottest source lines (share, instructions, line, source):")
for s, n, ln, text in sorted(data, reverse=True)[:25]:
    print(f"  {100 * s / total:5.1f}% {n:10.0f}  {ln:>5}  {text}")
PY
