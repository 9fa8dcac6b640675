#!/usr/bin/env bash
# Fourteenth session's Mosaic GPU probes (scripts/probe_mgpu_int4.py, 8192², one card): where
# the consumers' 3 µs go, from Mosaic GPU's on-device profiler (--profile: SM clock stamps of
# each warpgroup's ranges "upcast", "mma", "wait", "finish"; the gaps between them are the
# pipeline's barrier waits), then the zero points as z x Σx off each group's dot.
#   . scripts/gpu_setup.sh
#   bash scripts/probe_fourteenth.sh profile|packed|g128|lib|bench|decode|decode_ab|chain "$OUT"
# packed: the int4 words packed for the wgmma fragments (scripts/probe_mgpu_packed.py): its
#   tests, its PTX, its time beside the row-major kernel at T = 8 and 16, and its profile.
# g128: the packed words with g128 scales and zero points dequantized in registers (sub, mul
#   per bf16 pair), beside the row-major g128 kernel and int4_tc's calls; K per wgmma 256 / 64.
# lib: shrinkjax/kernels/int4_mgpu.py (TcInt4 words read as they are): its GPU tests, the int4
#   kernel tests around it, and int4_g128 calls at M = 1 / 4 / 8 / 16 with it and without.
# bench: int4_mgpu's GPU tests, 4096² and 4096 x 14336 calls with it forced (MIN_WAVE_FILL=0)
#   and without, and benchmarks/kernels.py's int4_g128 rows at M = 1 / 4 / 8 / 16.
# decode: benchmarks/decode.py's 8B-shaped bf16 and W4 decode at batch 1 and 16 (the int4
#   lm_head, 128256 rows, now runs int4_mgpu; the layers' linears keep the Triton kernel).
# decode_ab: the W4 decode with int4_mgpu off, on every linear (MIN_WAVE_FILL=0) and as by
#   default (the lm_head only), then bf16, in one call.
# chain (written for the next session, not run): int4_mgpu with the tiles' pipelines chained
#   (CHAIN_TILES) against the Triton kernel on several-wave shapes (2 waves, gate/up, lm_head).
# Everything is written to a work folder and packed into $OUT/probe_fourteenth.tar.gz (a call
# brings back at most 8 files); the profiles' tables are printed.
set -u
what=${1:?profile, packed, g128, lib, bench, decode, decode_ab or chain}
OUTDIR=${2:-/tmp/probe_fourteenth_out}
out=/tmp/probe_fourteenth
mkdir -p "$out" "$OUTDIR"
P="python3 scripts/probe_mgpu_int4.py"
. "$(dirname "$0")/probe_steps.sh"
pack() {
  for d in "$out"/prof_*; do # keep each config's last trace only
    [ -d "$d" ] && find "$d" -name '*-trace.json' | sort | head -n -1 | xargs -r rm -f
  done
  tar czf "$OUTDIR/probe_fourteenth.tar.gz" -C "$out" .
}
trap pack EXIT
if [ "$what" = profile ]; then
  step 120 test python3 -m pytest -q tests/test_probe_mgpu_int4_script.py \
    -k "profile or xsum or untimed"
  pr() { # name, probe flags: a profiled run (its table printed), json beside it
    local name=$1
    shift
    step 60 "prof_$name" $P --calls 3 --profile "$out/prof_$name" --json "$out/prof_$name.json" "$@"
  }
  pr bare8 --tokens 8
  pr stream8 --tokens 8 --stream-only --wgs 1,2
  pr stages8 --tokens 8 --split stages
  pr bare16 --tokens 16
  pr g128z8 --tokens 8 --scaled --zeros --zero-mode codes,xsum
  step 150 zeros $P --scaled --zeros --zero-mode codes,xsum --json "$out/zeros.json"
  step 90 triton python3 scripts/probe_call_kernels.py int4_g128:8 int4_g128:16
  exit 0
fi
if [ "$what" = packed ]; then # the words packed for the wgmma fragments (probe_mgpu_packed.py)
  step 150 test python3 -m pytest -q tests/test_probe_mgpu_packed_script.py
  mkdir -p "$out/dump"
  step 60 dump env MOSAIC_GPU_DUMP_TO="$out/dump" MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 \
    $P --tokens 8 --w-layout packed --untimed --calls 1
  step 150 time8 $P --tokens 8 --w-layout rowmajor,packed,packed-nosub --steps 3,4 \
    --json "$out/time8.json"
  step 100 time16 $P --tokens 16 --w-layout rowmajor,packed --steps 3,4 --json "$out/time16.json"
  step 60 prof_packed8 $P --tokens 8 --w-layout packed --calls 3 --profile "$out/prof_packed8" \
    --json "$out/prof_packed8.json"
  exit 0
fi
if [ "$what" = g128 ]; then # packed words with g128 scales and zeros dequantized in registers
  step 150 test python3 -m pytest -q tests/test_probe_mgpu_packed_script.py
  step 150 bare8 $P --tokens 8 --w-layout rowmajor,packed,packed-nosub --mma-k 256,64 \
    --json "$out/bare8.json"
  step 200 g128 $P --tokens 8,16 --scaled --zeros --w-layout rowmajor,packed --mma-k 256,64 \
    --json "$out/g128.json"
  step 90 triton python3 scripts/probe_call_kernels.py int4_g128:1 int4_g128:8 int4_g128:16
  step 60 prof_g128p8 $P --tokens 8 --scaled --zeros --w-layout packed --calls 3 \
    --profile "$out/prof_g128p8" --json "$out/prof_g128p8.json"
  exit 0
fi
if [ "$what" = lib ]; then # the library's Mosaic GPU int4 decode (shrinkjax/kernels/int4_mgpu.py)
  step 200 test python3 -m pytest -q -x tests/kernels/test_int4_mgpu.py
  step 200 test_int4 python3 -m pytest -q tests/kernels -k "int4 or convert or dispatch" \
    --deselect tests/kernels/test_int4_tc.py::test_gpu_native_matches_float64
  off=int4_tc.MGPU_DECODE=False
  step 150 calls python3 scripts/probe_call_kernels.py int4_g128:1 int4_g128:1:$off \
    int4_g128:4 int4_g128:4:$off int4_g128:8 int4_g128:8:$off int4_g128:16 int4_g128:16:$off \
    --json "$out/calls.json"
  exit 0
fi
if [ "$what" = bench ]; then # int4_mgpu: GPU tests, small-N shapes forced on it, kernels.py rows
  step 120 test python3 -m pytest -q tests/kernels/test_int4_mgpu.py
  on=int4_mgpu.MIN_WAVE_FILL=0
  for kn in "4096 4096" "4096 14336"; do
    set -- $kn
    step 100 "calls_$2" python3 scripts/probe_call_kernels.py --k "$1" --n "$2" int4_g128:1 \
      int4_g128:1:$on int4_g128:16 int4_g128:16:$on --json "$out/calls_$2.json"
  done
  step 240 kernels python3 benchmarks/kernels.py --kernels int4_g128 --ms 1,4,8,16 \
    --budget-s 150 --out "$out/kernels_int4.json"
  python3 -c "
import json; d = json.load(open('$out/kernels_int4.json')); print('copy', d['copy_tbps'])
for r in d['rows']: print(r['K'], r['N'], r['M'], round(r['us'], 2), round(r['bw_frac'], 3), r.get('cfg'), r.get('torch_bf16_us'), r.get('torch_us'))"
  exit 0
fi
if [ "$what" = decode ]; then # the 8B-shaped decode with int4_mgpu in the library (lm_head)
  step 280 decode python3 benchmarks/decode.py --formats bf16,int4_g128 --batches 1,16 \
    --lm-head format --attention pallas_decode --norm deferred --budget-s 220 \
    --out "$out/decode.json"
  tail -12 "$out/decode.log"
  exit 0
fi
if [ "$what" = decode_ab ]; then # the same W4 decode with int4_mgpu off / everywhere / default
  D="--batches 1,16 --lm-head format --attention pallas_decode --norm deferred --budget-s 100"
  for v in "off int4_tc MGPU_DECODE False" "all int4_mgpu MIN_WAVE_FILL 0" "default int4_tc MGPU_DECODE True"; do
    set -- $v
    step 150 "decode_$1" python3 -c "
import runpy, sys
from shrinkjax.kernels import $2
setattr($2, '$3', $4)
sys.argv = ['decode.py', '--formats', 'int4_g128', *'$D'.split(), '--out', '$out/decode_$1.json']
runpy.run_path('benchmarks/decode.py', run_name='__main__')"
    echo "== $1 ($2.$3=$4)"; grep "int4_g128  " "$out/decode_$1.log"
  done
  step 100 decode_bf16 python3 benchmarks/decode.py --formats bf16 $D --out "$out/decode_bf16.json"
  grep "bf16  " "$out/decode_bf16.log"
  exit 0
fi
if [ "$what" = chain ]; then # written for the next session: chained tile pipelines (not run yet)
  step 120 test python3 -m pytest -q tests/kernels/test_int4_mgpu.py -k chained
  on=int4_mgpu.CHAIN_TILES=True
  for kn in "4096 14336" "4096 28672" "4096 128256"; do # 2 waves, gate/up fused, the lm_head
    set -- $kn
    step 120 "chain_$2" python3 scripts/probe_call_kernels.py --k "$1" --n "$2" int4_g128:1 \
      int4_g128:1:$on int4_g128:16 int4_g128:16:$on --json "$out/chain_$2.json"
  done
  exit 0
fi
echo "unknown step $what" >&2
exit 2
