#!/usr/bin/env bash
# Thirteenth session's Mosaic GPU probes (scripts/probe_mgpu_int4.py, 8192², one card), each
# step under its own timeout so that a kernel that hangs costs its step, not the call:
#   1. x multicast to a cluster of 2 CTAs, bare int4, T = 8 (the first run of a cluster);
#   2. if that ran: clusters of 1 / 2 / 4 at T = 8 and 16, bare, g128, g128 with zero points;
#   3. the Triton int4_g128 decode calls beside them (probe_call_kernels.py);
#   4. 4 consumer warpgroups. They hung on the H100 (the pipeline's register split asks for
#      more registers than a CTA of 5 warpgroups is launched with); the kernel now refuses
#      them, so this step reports the ValueError.
# stream: the same TMA pipeline with no upcast and no MMA (--stream-only), over stage sizes
#   and depths, beside the bare kernel's best config: the ceiling of the structure's stream.
# consumer: the bare kernel's consumers, which the stream probe showed to be the limit: a
#   group's part of a stage in chunks of 128-256 columns per wgmma (one chunk's upcast beside
#   the previous chunk's MMA), and a stage's wgmma left in flight over the next (--overlap).
# stages: consumers taking whole stages in turn (--split stages), 2 or 3 of them (3 fit the
#   register file this way), beside the default split of each stage's K.
# ncu (written for the next session): Nsight Compute profiles of the kernel's default, its
#   stream alone and 2 groups on whole stages, T = 8 (scripts/ncu_decode.sh: stall samples
#   per SASS instruction), to find where the consumers' 3 µs go.
# zeros (written for the next session): zero points as z x Σx off each group's dot
#   (--zero-mode xsum) against off the upcast codes, beside int4_tc's g128 calls.
#   . scripts/gpu_setup.sh
#   bash scripts/probe_thirteenth.sh cluster|stream|consumer|stages|ncu|zeros "$OUT"
set -u
what=${1:?cluster, stream, consumer, stages, ncu or zeros}
out=${2:-/tmp/probe_thirteenth}
mkdir -p "$out"
P="python3 scripts/probe_mgpu_int4.py"
. "$(dirname "$0")/probe_steps.sh"
if [ "$what" = stream ]; then
  step 60 test python3 -m pytest -q tests/test_probe_mgpu_int4_script.py -k stream_only
  tail -1 "$out/test.log"
  step 240 stream $P --tokens 8 --wgs 1 --stream-only --tile-k 256,512,1024 --steps 2,3,4,6 \
    --json "$out/stream.json"
  step 60 mma $P --tokens 8 --json "$out/mma.json"
  exit 0
fi
if [ "$what" = zeros ]; then
  step 90 test python3 -m pytest -q tests/test_probe_mgpu_int4_script.py -k "xsum or untimed"
  tail -1 "$out/test.log"
  step 120 zeros $P --scaled --zeros --zero-mode codes,xsum --json "$out/zeros.json"
  step 90 triton python3 scripts/probe_call_kernels.py int4_g128:1 int4_g128:8 int4_g128:16
  exit 0
fi
if [ "$what" = ncu ]; then
  u="--tokens 8 --untimed --calls 3"
  NCU_SCRIPT=scripts/probe_mgpu_int4.py NCU_REGEX=mosaic timeout 400 \
    bash scripts/ncu_decode.sh "$out" "mgpu_t8|$u" "stream_t8|$u --stream-only" \
    "stages_t8|$u --split stages"
  exit 0
fi
if [ "$what" = stages ]; then
  step 60 test python3 -m pytest -q tests/test_probe_mgpu_int4_script.py -k "chunked and stages"
  tail -1 "$out/test.log"
  step 40 base $P --tokens 8 --json "$out/base.json"
  step 90 stages $P --tokens 8 --split stages --wgs 3,2 --steps 4,3 --json "$out/stages.json"
  step 30 t16 $P --tokens 16 --split stages --wgs 3 --steps 4 --json "$out/t16.json"
  exit 0
fi
if [ "$what" = consumer ]; then
  step 90 test python3 -m pytest -q tests/test_probe_mgpu_int4_script.py -k chunked
  tail -1 "$out/test.log"
  step 100 c512 $P --tokens 8 --tile-k 512 --chunk 0,128 --overlap 0,1 --json "$out/c512.json"
  step 130 c1024 $P --tokens 8 --tile-k 1024 --chunk 0,256,128 --overlap 0,1 \
    --json "$out/c1024.json"
  step 60 t16 $P --tokens 16 --overlap 0,1 --json "$out/t16.json"
  exit 0
fi
if step 120 cluster2 $P --tokens 8 --cluster 2 --json "$out/cluster2.json"; then
  step 150 bare $P --cluster 1,2,4 --json "$out/bare.json"
  step 150 scaled $P --scaled --cluster 1,2,4 --json "$out/scaled.json"
  step 120 zeros $P --scaled --zeros --cluster 1,2,4 --json "$out/zeros.json"
fi
step 90 triton python3 scripts/probe_call_kernels.py int4_g128:1 int4_g128:8 int4_g128:16
step 60 wgs4 $P --tokens 8 --wgs 4 --json "$out/wgs4.json"
