#!/usr/bin/env bash
# Nsight Compute source view of the one-CTA select (bench/select_phases.cu's launch, 8 x 32k by
# default): stall samples by reason and instructions per SASS instruction, summed per phase, to see
# which phase waits on what. Usage (GPU machine): OUT=dir bash bench/ncu_select_phases.sh [batch ctx]
# Writes select_phases_sass.csv (per SASS instruction: stall samples by reason, instructions) and
# prints them summed per phase: the phase clocks' CS2R ... SR_CLOCKLO reads cut the SASS into
# segments in code order (ncu's CUDA-source view of the header comes back without metrics).
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
ncu -i "$bin.ncu-rep" --page source --csv --print-source sass > "$OUT/select_phases_sass.csv" 2>&1
python3 - "$OUT/select_phases_sass.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
hi = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
if hi is None:
    sys.exit(f"no header: {rows[:3]}")
col = {h: i for i, h in enumerate(rows[hi])}
stalls = [h for h in rows[hi] if h.startswith("stall_") and "Not Issued" not in h]
segments, seg = [], None
for r in rows[hi + 1:]:
    if seg is None or "SR_CLOCKLO" in r[col["Source"]]:
        seg = {"first": r[col["Address"]], "n": 0, "samples": 0.0, "inst": 0.0, "stalls": {}}
        segments.append(seg)
    seg["n"] += 1
    seg["samples"] += float(r[col["Warp Stall Sampling (All Samples)"]] or 0)
    seg["inst"] += float(r[col["Instructions Executed"]] or 0)
    for h in stalls:
        seg["stalls"][h] = seg["stalls"].get(h, 0.0) + float(r[col[h]] or 0)
total = sum(s["samples"] for s in segments) or 1.0
print(f"{len(rows) - hi - 1} SASS instructions, {total:.0f} stall samples; per segment (code order, cut at clock reads):")
for k, s in enumerate(segments):
    top = sorted(s["stalls"].items(), key=lambda x: -x[1])[:4]
    print(f"  seg {k:2d}: {s['n']:5d} instrs, {s['inst']:9.0f} executed, {100 * s['samples'] / total:5.1f}% of samples; "
          + ", ".join(f"{h[6:]} {100 * v / total:.1f}%" for h, v in top))
PY
