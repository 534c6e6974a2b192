#!/usr/bin/env bash
# Nsight Compute profile of one kernel launch of the two-stage step (8 x 32k, 16-token blocks,
# C 0.5, keep 0.095): details and the hottest SASS instructions by stall samples.
# Usage (GPU machine, after the build): OUT=dir bash bench/ncu_select.sh [launch-skip] [kernel]
#   kernel: radar_select_kernel (default; launch 20 = the candidate select, 21 = the final one),
#   or e.g. sketch_score_kernel, refine_scores_kernel (launch-skip counts that kernel's launches).
#   PROFILE_CMD: the program to profile instead of the two-stage step, e.g. the qcodes step's
#   decode: PROFILE_CMD="bench/profile_step.py 8 32768 16 qcodes" bash bench/ncu_select.sh 3 sparse_decode_kernel
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
ncu --clock-control none --kernel-name "regex:${2:-radar_select_kernel}" --launch-skip "${1:-20}" --launch-count 1 --set full \
  --import-source yes -f -o "$OUT/select" python3 ${PROFILE_CMD:-bench/profile_refine.py 0.5 0.095} > "$OUT/ncu_select_run.log" 2>&1
echo "ncu rc=$?"
ncu -i "$OUT/select.ncu-rep" --page details --csv > "$OUT/select_details.csv" 2>&1
ncu -i "$OUT/select.ncu-rep" --page source --csv --print-source sass > "$OUT/select_sass.csv" 2>&1
ncu -i "$OUT/select.ncu-rep" --page source --csv --print-source cuda > "$OUT/select_cuda.csv" 2>&1
python3 - "$OUT" <<'PY'
import csv, sys, os
out = sys.argv[1]
rows = list(csv.reader(open(os.path.join(out, "select_details.csv"))))
hdr = rows[0] if rows else []
keep = ("Duration", "Elapsed Cycles", "Executed Ipc", "Issue Slots", "No Eligible", "Active Warps Per Scheduler",
        "Eligible Warps", "Warp Cycles Per Issued", "Executed Instructions", "Registers", "Achieved Occupancy",
        "Stall", "Dynamic Shared", "Block Limit", "L2 Hit", "Memory Throughput", "DRAM Throughput")
for r in rows[1:]:
    d = dict(zip(hdr, r))
    name = d.get("Metric Name", "")
    if any(k in name for k in keep):
        print(f"{d.get('Section Name','')[:28]:28} {name[:48]:48} {d.get('Metric Value','')} {d.get('Metric Unit','')}")
for fname in ("select_sass.csv", "select_cuda.csv"):
    try:
        rows = list(csv.reader(open(os.path.join(out, fname))))
    except Exception as e:
        print(fname, e); continue
    # find header row containing 'Source'
    hi = next((i for i, r in enumerate(rows) if "Source" in r), None)
    if hi is None:
        print(fname, "no header", rows[:3]); continue
    hdr = rows[hi]
    col = next((c for c in hdr if c.startswith("Warp Stall Sampling (All")), None)
    print(f"\n== {fname}: columns {hdr[:8]} ... sort by {col}")
    data = []
    for r in rows[hi + 1:]:
        d = dict(zip(hdr, r))
        try:
            v = float(d.get(col, "0") or 0)
        except ValueError:
            continue
        data.append((v, d))
    total = sum(v for v, _ in data) or 1
    data.sort(key=lambda x: -x[0])
    for v, d in data[:45]:
        print(f"{100*v/total:5.1f}% {d.get('Address','')[-5:]:>6} {d.get('Instructions Executed',''):>10} {d.get('Source','')[:100]}")
PY
