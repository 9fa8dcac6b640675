#!/usr/bin/env bash
# Nsight Compute profiles of the decode kernels (GPU machine; after `. scripts/gpu_setup.sh`).
#   scripts/ncu_decode.sh OUT_DIR "NAME|ncu_kernel.py args" ["NAME|args" ...]
# e.g. scripts/ncu_decode.sh $OUT "int4_m1|--kind int4_g128 --m 1" \
#        "int4_m1_s3|--kind int4_g128 --m 1 --tile num_stages=3"
# Per case: NAME.ncu-rep (the full set: stall sampling per SASS instruction), NAME.details.txt
# (speed of light, memory, warp states, occupancy), NAME.raw.csv (every metric) and NAME.sass.csv
# (per-instruction stall samples), NAME.stalls.txt (scripts/ncu_stalls.py's summary of it).
# The clocks stay as they are (--clock-control none); caches are flushed before the profiled
# launch (the default), so the weight comes from HBM as in a decode step.
# NCU_SCRIPT / NCU_REGEX (default scripts/ncu_kernel.py / _tc_) profile another script's
# kernel, e.g. the Mosaic GPU probe's:
#   NCU_SCRIPT=scripts/probe_mgpu_int4.py NCU_REGEX=mosaic scripts/ncu_decode.sh $OUT \
#     "mgpu_t8|--tokens 8 --untimed --calls 3" "stream_t8|--tokens 8 --untimed --stream-only"
set -u
if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR \"NAME|ncu_kernel.py args\" [...]" >&2
  exit 2
fi
out=$1
shift
mkdir -p "$out"
for case in "$@"; do
  name=${case%%|*}
  args=${case#*|}
  # shellcheck disable=SC2086
  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none --set full \
    -k "regex:${NCU_REGEX:-_tc_}" --launch-skip 1 --launch-count 1 -f -o "$out/$name" \
    python3 "${NCU_SCRIPT:-scripts/ncu_kernel.py}" $args >"$out/$name.log" 2>&1
  ncu --import "$out/$name.ncu-rep" --page details >"$out/$name.details.txt" 2>&1
  ncu --import "$out/$name.ncu-rep" --page source --csv --print-source sass \
    >"$out/$name.sass.csv" 2>&1
  ncu --import "$out/$name.ncu-rep" --page raw --csv >"$out/$name.raw.csv" 2>&1
  python3 scripts/ncu_stalls.py "$out/$name.sass.csv" --min-samples 10 >"$out/$name.stalls.txt" 2>&1
  echo "== $name: $(grep -m1 'rel. err\|err .*untimed' "$out/$name.log")"
  grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Issue Slots Busy|No Eligible|Active Warps Per Scheduler|Eligible Warps" "$out/$name.details.txt" | head -12
done
